//! The committed fuzz corpus (`fuzz/seeds/<target>/`) through the same property checks as
//! the cargo-fuzz targets (`mailwarden::fuzzing`), so that plain `cargo test`, and CI,
//! which does not fuzz, still exercises every seed (RELIABILITY B7, B8).

use std::path::{Path, PathBuf};

use mailwarden::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs every seed of `target`, naming the seed that breaks a property.
fn run_seeds(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let dir = fuzz_dir().join("seeds").join(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    let failed: Vec<String> = seeds
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("read seed");
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: properties fail on {failed:#?}"
    );
}

macro_rules! seed_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                run_seeds(stringify!($target));
            }
        )*

        /// Every target has a test here, a fuzz target file and seeds, and nothing else
        /// sits under fuzz/seeds/.
        #[test]
        fn targets_seeds_and_fuzz_targets_agree() {
            let tested = [$(stringify!($target)),*];
            let mut names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            names.sort();
            let mut sorted = tested.to_vec();
            sorted.sort();
            assert_eq!(names, sorted, "mailwarden::fuzzing::TARGETS and this file differ");
            let mut dirs: Vec<String> = std::fs::read_dir(fuzz_dir().join("seeds"))
                .expect("fuzz/seeds")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            dirs.sort();
            assert_eq!(dirs, names, "fuzz/seeds/ has a directory per target");
            for name in names {
                let target = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
                let source = std::fs::read_to_string(&target)
                    .unwrap_or_else(|e| panic!("{}: {e}", target.display()));
                assert!(
                    source.contains(&format!("mailwarden::fuzzing::{name}(data)")),
                    "{} does not call mailwarden::fuzzing::{name}",
                    target.display()
                );
            }
        }
    };
}

seed_tests!(
    smtp_commands,
    data_reader,
    reply_parser,
    message_verification,
    spf_record,
    config_policy,
    xclient,
    session,
);
