//! Versioned, bounded, introspectable descriptions of device state, and their wire codec.
//!
//! A device keeps its runtime structures to itself and converts them to a plain *state
//! struct* for migration. `#[derive(VmState)]` on that struct yields a const
//! [`VmStateDescription`] (the contract: names, types, versions, bounds, subsections) and a
//! codec that follows it. Loading is parsing hostile input: every length, version and
//! subsection is checked, [`VmStateError`] names the path of the failing field, and nothing
//! panics or allocates beyond the declared bounds.
//!
//! ```
//! use baton_vmstate::{VmState, VmStateError};
//!
//! #[derive(VmState, Debug, Default, PartialEq)]
//! #[vmstate(name = "queue", version = 1)]
//! struct QueueState {
//!     size: u16,
//!     next_avail: u16,
//! }
//!
//! #[derive(VmState, Debug, Default, PartialEq)]
//! #[vmstate(name = "example-net", version = 2, validate = check)]
//! struct NetState {
//!     mac: [u8; 6],
//!     #[vmstate(max = 64)]
//!     queues: Vec<QueueState>,
//!     #[vmstate(since = 2)]
//!     link_up: bool,
//! }
//!
//! fn check(s: &NetState) -> Result<(), VmStateError> {
//!     for (i, q) in s.queues.iter().enumerate() {
//!         if q.next_avail >= q.size {
//!             let path = format!("queues[{i}].next_avail");
//!             return Err(VmStateError::invalid(&path, format!(
//!                 "{} exceeds size {}", q.next_avail, q.size)));
//!         }
//!     }
//!     Ok(())
//! }
//!
//! let s = NetState { mac: [2, 0, 0, 0, 0, 1], queues: vec![QueueState { size: 256, next_avail: 7 }], link_up: true };
//! let blob = s.save();
//! assert_eq!(NetState::load(&blob, 2).unwrap(), s);
//! println!("{}", NetState::VMSD.to_json_pretty());
//! ```

mod codec;
mod description;
mod error;
mod json;

pub use baton_vmstate_derive::VmState;
pub use codec::{
    check_version, decode_string, decode_vec, duplicate_subsection, encode_string,
    encode_subsection, encode_unused, encode_vec, finish_subsection, unknown_subsection, Reader,
    VmState, VmStateField, END_MARKER, SUBSECTION_MARKER,
};
pub use description::{Field, FieldKind, SchemaRef, Subsection, VmStateDescription};
pub use error::{ErrorKind, PathSegment, VmStateError};
pub use json::decode_to_json;
