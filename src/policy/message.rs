//! One message's header section, parsed once at the end of DATA and read by every
//! stage of the pipeline (`crate::pipeline`): header sanity, the outbound From check,
//! verification, the spoof flags, the rules, the quarantine entry and the decision log.
//!
//! It lives here, below the pipeline, because the rules stage (`super::engine`) reads it
//! and must not import the layer above it.

use std::sync::OnceLock;

use super::sanity::{self, Author, Problem};
use super::spoof;
use crate::auth::headers::{self, Field};

/// Each part is computed on first use and kept: once at most, and never for a message
/// nobody reads (checks off, no outbound stage: the plain relay path).
pub struct ParsedMessage<'a> {
    /// The canonical message (CRLF lines, dot-stuffing removed).
    pub bytes: &'a [u8],
    fields: OnceLock<Vec<Field<'a>>>,
    author: OnceLock<AuthorPart>,
}

/// The header-sanity finding and every From mailbox.
struct AuthorPart {
    author: Result<Author, Problem>,
    from_mailboxes: Vec<(String, String)>,
}

impl<'a> ParsedMessage<'a> {
    pub fn parse(bytes: &'a [u8]) -> ParsedMessage<'a> {
        ParsedMessage {
            bytes,
            fields: OnceLock::new(),
            author: OnceLock::new(),
        }
    }

    /// The header fields, in order.
    pub fn fields(&self) -> &[Field<'a>] {
        self.fields.get_or_init(|| headers::fields(self.bytes))
    }

    fn author_part(&self) -> &AuthorPart {
        self.author.get_or_init(|| {
            let fields = self.fields();
            let author = sanity::check(fields);
            let from_mailboxes = match &author {
                Ok(a) => a.mailboxes.clone(),
                Err(_) => fields
                    .iter()
                    .filter(|f| f.name.eq_ignore_ascii_case("From"))
                    .flat_map(|f| spoof::parse_from_mailboxes(&f.value))
                    .collect(),
            };
            AuthorPart {
                author,
                from_mailboxes,
            }
        })
    }

    /// The header-sanity stage's finding: the one author, or what is wrong.
    pub fn author(&self) -> &Result<Author, Problem> {
        &self.author_part().author
    }

    /// Every mailbox of every From field (display name, address): with a sane header,
    /// the one author's mailboxes. The spoof checks look at all of them.
    pub fn from_mailboxes(&self) -> &[(String, String)] {
        &self.author_part().from_mailboxes
    }

    /// The author domain DMARC evaluates: the sane author's, else the first From
    /// mailbox's (so `check` and the log still show every result).
    pub fn from_domain(&self) -> String {
        match self.author() {
            Ok(a) => a.domain.clone(),
            Err(_) => self
                .from_mailboxes()
                .first()
                .and_then(|(_, a)| a.rsplit_once('@'))
                .map(|(_, d)| d.trim_end_matches('.').to_lowercase())
                .unwrap_or_default(),
        }
    }

    /// The first field called `name`, its value as written (unfolded).
    pub fn first(&self, name: &str) -> Option<&str> {
        headers::first(self.fields(), name).map(|f| &*f.value)
    }

    /// Every address of every From and Sender field, in the order of the fields: the
    /// outbound From policy covers all of them, so a second, foreign From (or a foreign
    /// Sender) does not pass because only the first was read.
    pub fn from_and_sender_addresses(&self) -> Vec<String> {
        self.fields()
            .iter()
            .filter(|f| {
                f.name.eq_ignore_ascii_case("From") || f.name.eq_ignore_ascii_case("Sender")
            })
            .flat_map(|f| spoof::parse_from_mailboxes(&f.value))
            .map(|(_, address)| address)
            .filter(|a| !a.is_empty())
            .collect()
    }
}
