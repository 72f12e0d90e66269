//! Man pages and shell completions, generated from the command line definition itself so
//! they cannot drift from it. `mailwarden generate-assets --out DIR` (a hidden subcommand)
//! writes them; `packaging/build-deb.sh` runs it and installs the result.

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The shells we ship completions for, each with the file name its completion loader
/// expects in its vendor directory.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "mailwarden"),
    (Shell::Zsh, "_mailwarden"),
    (Shell::Fish, "mailwarden.fish"),
];

/// Writes `DIR/man/*.1` (one page per visible command, subcommands included) and
/// `DIR/completions/{bash,zsh,fish}/NAME`. Returns every file written.
pub fn write_all(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = write_man_pages(cmd.clone(), &dir.join("man"))?;
    written.extend(write_completions(cmd, &dir.join("completions"))?);
    Ok(written)
}

/// One section-1 page per command that is not hidden: `mailwarden.1`,
/// `mailwarden-quarantine.1`, `mailwarden-quarantine-list.1`, …
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // Built first so that subcommands carry their full names ("mailwarden-quarantine-list")
    // and the global -c/--config is propagated into every page's OPTIONS.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page_and_children(cmd, dir, &mut written)?;
    Ok(written)
}

fn page_and_children(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page_and_children(sub.clone(), dir, out)?;
    }
    out.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    Ok(())
}

/// Completion scripts for bash, zsh and fish, under `dir/<shell>/`.
pub fn write_completions(mut cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let bin = cmd.get_name().to_string();
    let mut written = Vec::new();
    for (shell, file) in SHELLS {
        let shell_dir = dir.join(shell.to_string());
        std::fs::create_dir_all(&shell_dir)?;
        let path = shell_dir.join(file);
        let mut f = std::fs::File::create(&path)?;
        clap_complete::generate(shell, &mut cmd, &bin, &mut f);
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn sample() -> Command {
        Command::new("mailwarden")
            .version("1.2.3")
            .arg(Arg::new("config").short('c').long("config").global(true))
            .subcommand(
                Command::new("quarantine")
                    .about("held mail")
                    .subcommand(Command::new("list").about("list held mail")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_command_with_the_global_option() {
        let d = tempfile::tempdir().unwrap();
        let files = write_man_pages(sample(), d.path()).unwrap();
        let mut names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "mailwarden-quarantine-list.1",
                "mailwarden-quarantine.1",
                "mailwarden.1"
            ]
        );
        let leaf = std::fs::read_to_string(d.path().join("mailwarden-quarantine-list.1")).unwrap();
        assert!(leaf.contains("config"), "global option missing:\n{leaf}");
    }

    #[test]
    fn completions_for_three_shells_name_the_subcommands() {
        let d = tempfile::tempdir().unwrap();
        let files = write_completions(sample(), d.path()).unwrap();
        assert_eq!(files.len(), 3);
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.contains("quarantine"), "{}", f.display());
        }
        assert!(d.path().join("zsh/_mailwarden").exists());
    }
}
