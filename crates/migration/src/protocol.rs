//! The baton migration protocol: channels, sections, and the order they come in.
//!
//! Every channel (socket or snapshot file) starts with a [`ChannelHeader`], so a peer never
//! has to guess what it is reading. The main channel then carries framed sections in both
//! directions (the destination's answers form the *return path*):
//!
//! ```text
//! source                                              destination
//! main:  ChannelHeader(kind=main, index=0)       --->  check magic, version, kind
//!        HANDSHAKE  (JSON: machine, capabilities,
//!                    parameters, devices, RAM,
//!                    planned channels)            --->  validate everything
//!                                                 <---  HANDSHAKE_REPLY (accept | errors)
//!        (rejected: both sides fail with the same errors; nothing was paused or moved)
//! ram i: ChannelHeader(kind=ram, index=i)         --->  match session id, index
//!        RAM_MEMFDS  + fds (local mode)           --->  map guest RAM from the fds,
//!                                                       build the VM around it
//!                                                 <---  RAM_MAPPED (local mode)
//!        EARLY_STATE per device (early-setup)     --->  prepare
//!                                                 <---  SWITCHOVER_ACK (all prepared)
//!        RAM_PAGES ... (remote: on main or ram i),
//!        RAM_ITERATION_END after each pass        --->  write pages
//!  -- pause vCPUs --
//!        RAM_PAGES (final dirty pages), RAM_EOS on every RAM channel
//!        SWITCHOVER                               --->  wait for every RAM channel's EOS
//!        EARLY_FINAL per early device (unchanged | new state)
//!        DEVICE_STATE per device
//!        BACKEND per transferring device + fds    --->  finish early, adopt, load
//!        END
//!        SCHEMA (JSON trailer)                    --->  everything loaded
//!                                                 <---  READY
//!  -- commit: cancel has no effect from here --
//!        GO                                       --->  resume vCPUs
//!                                                 <---  RUNNING (destination timings)
//!  -- release backends, exit --
//! any time:                                       <---  ERROR (text)   -> source resumes
//! ```
//!
//! RAM_MAPPED keeps the destination's expensive preparation (mapping RAM, KVM memory
//! slots, vCPUs: ~10 ms whatever the RAM size) before the source pauses.
//!
//! READY/GO is a two-phase commit. Without it a source cancelled (or failing) after its
//! last byte would resume while the destination, holding the complete stream, resumed
//! too: two guests on one disk and, in local mode, one RAM. Now the destination resumes
//! only on GO, and the source sends GO only if nobody cancelled it first. The destination
//! sends ERROR only while it has not resumed, so an ERROR after GO still lets the source
//! resume; a connection lost between GO and RUNNING leaves the outcome unknown, and the
//! source then stays paused (`MigrationError::Unconfirmed`).
//!
//! A snapshot file is the same stream with no return path and no fds: header, HANDSHAKE,
//! RAM_PAGES of every page, the device sections, END, SCHEMA.
//!
//! Section framing: `type u8 | seq u32 | length u32 | payload | footer u32`, where `seq`
//! counts sections per channel and direction from 0 and `footer = FOOTER_MAGIC ^ seq`. A
//! lost, duplicated or misaligned byte is caught at the section where it happens.

use crate::error::StreamError;

/// First bytes of every channel.
pub const MAGIC: [u8; 8] = *b"BATONMIG";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// XORed with the section sequence number to form the footer.
pub const FOOTER_MAGIC: u32 = 0x5EC7_10FF;
/// Largest section payload accepted (guards allocation on hostile input).
pub const MAX_SECTION_LEN: u32 = 64 << 20;
/// Largest number of fds accepted with one section.
pub const MAX_SECTION_FDS: usize = 64;
/// Guest page size the RAM sections use.
pub const PAGE_SIZE: u64 = 4096;

/// What a channel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// Handshake, device state, fds, return path; RAM too when there are no RAM channels.
    Main = 0,
    /// RAM pages only (multifd).
    Ram = 1,
}

/// The self-identification at the start of every channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelHeader {
    pub version: u32,
    pub session: [u8; 16],
    pub kind: ChannelKind,
    pub index: u16,
}

impl ChannelHeader {
    pub const LEN: usize = 8 + 4 + 16 + 1 + 2;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..28].copy_from_slice(&self.session);
        b[28] = self.kind as u8;
        b[29..31].copy_from_slice(&self.index.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, StreamError> {
        if b[..8] != MAGIC {
            return Err(StreamError::BadChannelHeader(format!(
                "bad magic {:02x?} (expected {:02x?} \"BATONMIG\")",
                &b[..8],
                MAGIC
            )));
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != PROTOCOL_VERSION {
            return Err(StreamError::BadChannelHeader(format!(
                "protocol version {version} is not supported (this build speaks {PROTOCOL_VERSION})"
            )));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&b[12..28]);
        let kind = match b[28] {
            0 => ChannelKind::Main,
            1 => ChannelKind::Ram,
            k => {
                return Err(StreamError::BadChannelHeader(format!(
                    "unknown channel kind {k}"
                )))
            }
        };
        Ok(ChannelHeader {
            version,
            session,
            kind,
            index: u16::from_le_bytes([b[29], b[30]]),
        })
    }
}

macro_rules! section_types {
    ($($name:ident = $v:expr, $text:expr;)*) => {
        /// The type byte of a section.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum SectionType { $($name = $v),* }

        impl SectionType {
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $($v => Some(SectionType::$name),)* _ => None }
            }
            pub fn name(self) -> &'static str {
                match self { $(SectionType::$name => $text),* }
            }
        }
    };
}

section_types! {
    Handshake = 1, "HANDSHAKE";
    HandshakeReply = 2, "HANDSHAKE_REPLY";
    RamMemfds = 3, "RAM_MEMFDS";
    EarlyState = 4, "EARLY_STATE";
    SwitchoverAck = 5, "SWITCHOVER_ACK";
    RamPages = 6, "RAM_PAGES";
    RamIterationEnd = 7, "RAM_ITERATION_END";
    RamEos = 8, "RAM_EOS";
    Switchover = 9, "SWITCHOVER";
    EarlyFinal = 10, "EARLY_FINAL";
    DeviceState = 11, "DEVICE_STATE";
    Backend = 12, "BACKEND";
    End = 13, "END";
    Schema = 14, "SCHEMA";
    Running = 15, "RUNNING";
    Error = 16, "ERROR";
    Ready = 17, "READY";
    Go = 18, "GO";
    RamMapped = 19, "RAM_MAPPED";
}

impl std::fmt::Display for SectionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes before a section's payload: type, seq, length.
pub const SECTION_HEADER_LEN: usize = 9;

pub fn encode_section_header(ty: SectionType, seq: u32, len: u32) -> [u8; SECTION_HEADER_LEN] {
    let mut h = [0u8; SECTION_HEADER_LEN];
    h[0] = ty as u8;
    h[1..5].copy_from_slice(&seq.to_le_bytes());
    h[5..9].copy_from_slice(&len.to_le_bytes());
    h
}

pub fn footer(seq: u32) -> [u8; 4] {
    (FOOTER_MAGIC ^ seq).to_le_bytes()
}
