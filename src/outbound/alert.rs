//! Alerts: one WARN line per event, and the same as JSON POSTed to `webhook_url`.
//!
//! The webhook is a hand-written HTTP/1.1 POST over a tokio TCP stream (plain `http://`
//! only, no new client crate): at most `MAX_INFLIGHT` posts at a time, each bounded by
//! `TIMEOUT`, fire-and-forget (an alert is never worth delaying mail); a failure is a WARN.
//! Only the webhook's host and port are ever logged (its path may hold a token).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

const MAX_INFLIGHT: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::config::outbound::WebhookTarget;

impl WebhookTarget {
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// The JSON an alert is posted as.
#[derive(Debug, Clone, Serialize)]
pub struct AlertBody {
    /// `outbound-burst`, `from-mismatch`, `auth-failures`, `account-frozen`,
    /// `account-unfrozen`, `freeze-expired`.
    pub event: &'static str,
    /// Seconds since the epoch.
    pub at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    /// `name=value` of each signal over its limit.
    pub signals: Vec<String>,
    /// `name=limit` for each of them.
    pub thresholds: Vec<String>,
    pub reasons: Vec<String>,
}

pub struct Alerter {
    target: Option<WebhookTarget>,
    inflight: Arc<Semaphore>,
}

impl Alerter {
    pub fn new(url: Option<&str>) -> Alerter {
        Alerter {
            target: url.and_then(|u| WebhookTarget::parse(u).ok()),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        }
    }

    /// Posts `body` to the webhook in the background, when one is configured.
    pub fn post(&self, body: &AlertBody) {
        let Some(target) = self.target.clone() else {
            return;
        };
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            tracing::warn!(
                event = body.event,
                "outbound: webhook busy, alert not posted"
            );
            return;
        };
        let json = serde_json::to_string(body).unwrap_or_default();
        let event = body.event;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(TIMEOUT, send(&target, &json)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    tracing::debug!(event, status, "outbound: webhook posted");
                }
                Ok(Ok(status)) => {
                    tracing::warn!(event, status, webhook = %format!("{}:{}", target.host, target.port), "outbound: webhook refused the alert");
                }
                Ok(Err(e)) => {
                    tracing::warn!(event, error = %e, webhook = %format!("{}:{}", target.host, target.port), "outbound: webhook failed");
                }
                Err(_) => {
                    tracing::warn!(event, webhook = %format!("{}:{}", target.host, target.port), "outbound: webhook timed out");
                }
            }
        });
    }
}

/// One POST; the response's status code.
async fn send(t: &WebhookTarget, json: &str) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect((t.host.as_str(), t.port)).await?;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: mailwarden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        t.path,
        t.host_header(),
        json.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    // The status line is all we need; read at most a little.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an HTTP response",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls_only() {
        assert_eq!(
            WebhookTarget::parse("http://127.0.0.1:9000/hooks/x?token=1").unwrap(),
            WebhookTarget {
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/hooks/x?token=1".into()
            }
        );
        assert_eq!(
            WebhookTarget::parse("http://alerts.example").unwrap().port,
            80
        );
        let v6 = WebhookTarget::parse("http://[::1]:81/a").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.host_header()),
            ("::1", 81, "[::1]:81".to_string())
        );
        assert!(WebhookTarget::parse("https://alerts.example/").is_err());
        assert!(WebhookTarget::parse("http://user:pw@alerts.example/").is_err());
        assert!(WebhookTarget::parse("http://:80/").is_err());
        assert!(WebhookTarget::parse("http://h:x/").is_err());
    }

    #[tokio::test]
    async fn posts_json() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if body.len() >= len {
                        s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                            .await
                            .unwrap();
                        return text;
                    }
                }
            }
        });
        let a = Alerter::new(Some(&format!("http://127.0.0.1:{port}/hook")));
        a.post(&AlertBody {
            event: "outbound-burst",
            at: 1,
            account: Some("a@example.org".into()),
            client: None,
            action: Some("freeze"),
            signals: vec!["recipients_1m=330".into()],
            thresholds: vec!["recipients_1m=300".into()],
            reasons: vec![],
        });
        let req = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("Host: 127.0.0.1:{port}\r\n")),
            "{req}"
        );
        assert!(req.contains("\"event\":\"outbound-burst\""), "{req}");
    }
}
