//! One whole transaction on a connection of its own, for mail the proxy sends itself (a
//! quarantine release, a DMARC aggregate report): MAIL, each RCPT, DATA (or one BDAT when
//! the next hop offers CHUNKING), then QUIT.

use std::sync::Arc;

use smtp_proto::{MailFrom, RcptTo};

use super::{ClientIdentity, Envelope, NextHop, Opening, Relay, RelayError};
use crate::wire::reply::Reply;

/// What to send, and as whom.
pub struct Message<'a> {
    pub client: &'a ClientIdentity,
    pub from: &'a MailFrom<String>,
    pub rcpts: &'a [RcptTo<String>],
    /// The message's size as announced in MAIL FROM (SIZE=).
    pub size: usize,
    /// Header fields put before the message (see [`Relay::deliver`]).
    pub headers: &'a [String],
    pub parts: &'a [&'a [u8]],
}

/// The next hop's last word on a transaction that ran to its end or was refused.
pub enum Sent {
    /// Delivered to `accepted`; `reply` is the answer to the end of data.
    Delivered {
        accepted: Vec<RcptTo<String>>,
        reply: Reply,
    },
    /// Refused at MAIL, at a recipient `skip` did not pass over, at the end of data, or
    /// (550 5.1.1) every recipient was skipped.
    Refused(Reply),
}

/// Runs the transaction on a fresh connection to `hop` and closes it. `skip` is asked
/// about each refused recipient: true leaves it out and goes on, false refuses the whole
/// transaction with that reply. `Err` is a next-hop failure (see [`RelayError`]).
pub async fn send(
    hop: Arc<NextHop>,
    out: Message<'_>,
    mut skip: impl FnMut(&RcptTo<String>, &Reply) -> bool,
) -> Result<Sent, RelayError> {
    let mut relay = Relay::new(hop);
    let sent = async {
        let Some(first) = out.rcpts.first() else {
            return Ok(Sent::Refused(Reply::every_destination_refused()));
        };
        let mut first_reply = match relay.start(out.client, out.from, out.size, first).await? {
            Opening::Refused(reply) => return Ok(Sent::Refused(reply)),
            Opening::Started(reply) => Some(reply?),
        };
        let mut accepted = Vec::new();
        for rcpt in out.rcpts {
            // The first recipient was answered with MAIL.
            let reply = match first_reply.take() {
                Some(reply) => reply,
                None => relay.rcpt(rcpt).await?,
            };
            if reply.is_positive() {
                accepted.push(rcpt.clone());
            } else if !skip(rcpt, &reply) {
                return Ok(Sent::Refused(reply));
            }
        }
        if accepted.is_empty() {
            return Ok(Sent::Refused(Reply::every_destination_refused()));
        }
        let envelope = Envelope {
            from: out.from,
            rcpts: &accepted,
        };
        let reply = relay.deliver(&envelope, out.headers, out.parts).await?;
        Ok(if reply.is_positive() {
            Sent::Delivered { accepted, reply }
        } else {
            Sent::Refused(reply)
        })
    }
    .await;
    relay.close().await;
    sent
}
