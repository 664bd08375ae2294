//! Splitting a byte stream into JSON messages.
//!
//! QMP has no framing of its own: a client may write several messages in one write, or
//! one message over many writes, and a message may span lines. Like QEMU's JSON
//! streamer, the [`Framer`] tracks strings and bracket depth to find where each
//! top-level value ends, without parsing it; the complete message is then parsed by
//! serde_json, which produces the precise error text.
//!
//! Limits are enforced while bytes arrive, so a hostile client cannot make the server
//! buffer more than `max_size` bytes: a message that grows past `max_size`, or nests
//! deeper than `max_depth`, yields one [`FrameError`] and the rest of it is skipped
//! (still tracking depth, in constant memory) so the next message is read normally.

use std::fmt;

/// One unit of input found by the [`Framer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one complete top-level JSON value (not yet validated).
    Message(Vec<u8>),
    /// Input that cannot be a message; it has been skipped.
    Error(FrameError),
}

/// Why input was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The message grew past the size limit (bytes).
    TooLarge(usize),
    /// Arrays/objects nested deeper than the limit.
    TooDeep(usize),
    /// A closing bracket with no value open.
    Stray(char),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge(limit) => {
                write!(f, "JSON message size limit exceeded ({limit} bytes)")
            }
            FrameError::TooDeep(limit) => {
                write!(f, "JSON nesting depth limit exceeded ({limit} levels)")
            }
            FrameError::Stray(c) => write!(f, "JSON parse error, stray '{c}'"),
        }
    }
}

/// Incremental splitter of a byte stream into top-level JSON values.
#[derive(Debug)]
pub struct Framer {
    max_size: usize,
    max_depth: usize,
    buf: Vec<u8>,
    /// Open `{`/`[` count of the current message.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A top-level scalar (number, keyword or string) is being collected.
    scalar: bool,
    /// The current message broke a limit: its bytes are being dropped.
    discarding: bool,
}

impl Framer {
    /// A framer for messages of at most `max_size` bytes nested at most `max_depth` deep.
    pub fn new(max_size: usize, max_depth: usize) -> Self {
        Framer {
            max_size: max_size.max(2),
            max_depth: max_depth.max(1),
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            scalar: false,
            discarding: false,
        }
    }

    /// Whether a message has started and not ended (used to log a client that leaves
    /// mid-message).
    pub fn is_partial(&self) -> bool {
        self.depth > 0 || self.scalar || self.in_string || self.discarding
    }

    /// Feeds bytes; appends every frame they complete to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.in_string {
            self.store(b, out);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    // A top-level string scalar is complete.
                    self.finish(out);
                }
            }
            return;
        }
        match b {
            b'{' | b'[' => {
                if self.depth == 0 && self.scalar {
                    self.finish(out);
                }
                self.depth = self.depth.saturating_add(1);
                if self.depth > self.max_depth && !self.discarding {
                    self.fail(FrameError::TooDeep(self.max_depth), out);
                }
                self.store(b, out);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    if self.scalar {
                        self.finish(out);
                    }
                    out.push(Frame::Error(FrameError::Stray(b as char)));
                    return;
                }
                self.store(b, out);
                self.depth -= 1;
                if self.depth == 0 {
                    self.finish(out);
                }
            }
            b'"' => {
                if self.depth == 0 && self.scalar {
                    self.finish(out);
                }
                if self.depth == 0 {
                    self.scalar = true;
                }
                self.in_string = true;
                self.store(b, out);
            }
            b' ' | b'\t' | b'\r' | b'\n' => {
                if self.depth == 0 {
                    if self.scalar {
                        self.finish(out);
                    }
                } else {
                    self.store(b, out);
                }
            }
            _ => {
                if self.depth == 0 {
                    self.scalar = true;
                }
                self.store(b, out);
            }
        }
    }

    /// Appends a byte of the current message, enforcing the size limit.
    fn store(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= self.max_size {
            self.fail(FrameError::TooLarge(self.max_size), out);
            return;
        }
        self.buf.push(b);
    }

    /// Reports the current message as broken and drops the rest of it.
    fn fail(&mut self, err: FrameError, out: &mut Vec<Frame>) {
        out.push(Frame::Error(err));
        self.discarding = true;
        self.buf = Vec::new();
    }

    /// The current top-level value ended.
    fn finish(&mut self, out: &mut Vec<Frame>) {
        if !self.discarding && !self.buf.is_empty() {
            out.push(Frame::Message(std::mem::take(&mut self.buf)));
        }
        self.buf.clear();
        self.discarding = false;
        self.scalar = false;
        self.escaped = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut Framer, input: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        framer.feed(input, &mut out);
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn several_messages_in_one_feed() {
        let mut f = Framer::new(1024, 8);
        let out = frames(&mut f, b"{\"a\":1}{\"b\":[2]}\n  {\"c\":\"}\"}");
        assert_eq!(
            out,
            vec![msg("{\"a\":1}"), msg("{\"b\":[2]}"), msg("{\"c\":\"}\"}")]
        );
        assert!(!f.is_partial());
    }

    #[test]
    fn one_message_split_byte_by_byte() {
        let mut f = Framer::new(1024, 8);
        let input = b"{\"execute\":\n \"x\\\"}\", \"arguments\": {}}";
        let mut out = Vec::new();
        for b in input.iter() {
            f.feed(&[*b], &mut out);
        }
        assert_eq!(out, vec![Frame::Message(input.to_vec())]);
    }

    #[test]
    fn top_level_scalars_are_frames() {
        let mut f = Framer::new(1024, 8);
        let out = frames(&mut f, b"42 \"str\"true{\"x\":1}null ");
        assert_eq!(
            out,
            vec![
                msg("42"),
                msg("\"str\""),
                msg("true"),
                msg("{\"x\":1}"),
                msg("null")
            ]
        );
    }

    #[test]
    fn stray_closer_is_reported_and_skipped() {
        let mut f = Framer::new(1024, 8);
        let out = frames(&mut f, b"} {\"a\":1}");
        assert_eq!(
            out,
            vec![Frame::Error(FrameError::Stray('}')), msg("{\"a\":1}")]
        );
    }

    #[test]
    fn oversized_message_is_skipped_then_framing_resumes() {
        let mut f = Framer::new(16, 8);
        let out = frames(&mut f, b"{\"a\":\"0123456789abcdef{[\"}{\"b\":2}");
        assert_eq!(
            out,
            vec![Frame::Error(FrameError::TooLarge(16)), msg("{\"b\":2}")]
        );
    }

    #[test]
    fn too_deep_is_skipped_then_framing_resumes() {
        let mut f = Framer::new(1024, 3);
        let out = frames(&mut f, b"[[[[1]]]] [[1]]");
        assert_eq!(
            out,
            vec![Frame::Error(FrameError::TooDeep(3)), msg("[[1]]")]
        );
    }

    #[test]
    fn partial_message_is_reported() {
        let mut f = Framer::new(1024, 8);
        assert!(frames(&mut f, b"{\"a\": [1, 2").is_empty());
        assert!(f.is_partial());
    }
}
