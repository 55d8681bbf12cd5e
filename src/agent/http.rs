//! A tiny blocking HTTP/1.1 responder for probes and scrapes: GET (or HEAD) of a path, one
//! request per connection, answered in its own thread so a slow client delays nobody but itself
//! for longer than `IO_TIMEOUT`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A request head larger than this is refused; probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections answered at once; more are closed unanswered (a probe retries).
const MAX_CONNECTIONS: usize = 16;

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Holds one of the `MAX_CONNECTIONS` slots until dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        let taken = ACTIVE.fetch_add(1, Ordering::AcqRel) < MAX_CONNECTIONS;
        let slot = Slot;
        taken.then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Answers every connection on `listener` with `handler(path)`, for ever.
pub fn serve(listener: TcpListener, handler: impl Fn(&str) -> Response + Send + Sync + 'static) {
    let handler = Arc::new(handler);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Some(slot) = Slot::take() else { continue };
        let handler = Arc::clone(&handler);
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                answer(stream, handler.as_ref());
                drop(slot);
            });
        if let Err(e) = spawned {
            log::warn!("http: cannot start a thread for a connection: {e}");
        }
    }
}

fn answer(mut stream: TcpStream, handler: &dyn Fn(&str) -> Response) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let (response, head_only) = match read_head(&mut stream) {
        Ok(head) => match parse_request_line(&head) {
            Ok((method, path)) => (handler(path), method == "HEAD"),
            Err(response) => (response, false),
        },
        Err(response) => (response, false),
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if !head_only {
        let _ = stream.write_all(response.body.as_bytes());
    }
    let _ = stream.flush();
}

/// The request head up to the blank line, as text. The whole head must come within
/// `IO_TIMEOUT`: a client trickling a byte now and then cannot hold a slot for hours (sixteen
/// of them would starve the kubelet's probes).
fn read_head(stream: &mut TcpStream) -> Result<String, Response> {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD {
            return Err(Response::text(431, "request head too large\n"));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(Response::text(400, "request head too slow\n"));
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) => return Err(Response::text(400, "incomplete request\n")),
        }
    }
    String::from_utf8(head).map_err(|_| Response::text(400, "request is not UTF-8\n"))
}

/// The method and path (query dropped) of `GET`/`HEAD` requests.
fn parse_request_line(head: &str) -> Result<(&str, &str), Response> {
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(Response::text(400, "malformed request line\n"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::text(400, "HTTP/1.x only\n"));
    }
    if method != "GET" && method != "HEAD" {
        return Err(Response::text(405, "GET or HEAD only\n"));
    }
    Ok((method, target.split('?').next().unwrap_or(target)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /readyz?verbose HTTP/1.1\r\nHost: x\r\n\r\n").ok(),
            Some(("GET", "/readyz"))
        );
        assert_eq!(
            parse_request_line("HEAD / HTTP/1.0\r\n\r\n").ok(),
            Some(("HEAD", "/"))
        );
        for bad in [
            "POST / HTTP/1.1",
            "GET /",
            "GET / SPDY/3",
            "GET  / HTTP/1.1",
            "",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serves_paths_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            serve(listener, |path| match path {
                "/x" => Response::text(200, "yes\n"),
                _ => Response::text(404, "no\n"),
            })
        });
        let get = |request: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nyes\n"), "{ok}");
        assert!(get("GET /y HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(get("DELETE /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        // All of it is read before the answer (unread data would reset the connection).
        let huge = format!("GET /x HTTP/1.1\r\nX: {}", "a".repeat(9_000));
        assert!(get(&huge).starts_with("HTTP/1.1 431 "));
    }
}
