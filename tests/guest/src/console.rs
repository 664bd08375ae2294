//! Status lines to the host, and how the guest stops.
//!
//! Two transports, chosen on the command line (see `cmdline`):
//! * MMIO (`baton.console=mmio:ADDR`, what baton-vmm uses): the baton status device.
//!   A whole line costs one MMIO exit: the guest writes `len << 48 | gpa` of the line
//!   to the LINE register and the host reads the bytes from guest RAM (the guest's
//!   memory is identity mapped, so a pointer is a guest-physical address).
//! * Port I/O (`baton.console=pio:PORT`, default COM1 = 0x3f8, what QEMU's microvm
//!   has): bytes go out one `outb` each through the CPL0 `int $0x81` service, because
//!   `kvm_pvm` faults port I/O at CPL3. Slow under `kvm_pvm`, fine under QEMU.
//!
//! Status device registers (all little-endian, one 4 KiB page):
//! * 0x00 MAGIC (r, u32) = 0xba70_57a7; 0x04 VERSION (r, u32) = 1
//! * 0x08 CHAR  (w, u8): one byte of a line; `\n` ends the line
//! * 0x10 LINE  (w, u64): bits 0..48 guest-physical address, bits 48..64 length
//! * 0x18 EXIT  (w, u32): the guest is finished; 0 = success, anything else = failure

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::boot;
use crate::cmdline::Console;

/// Status device register offsets.
pub const REG_LINE: u64 = 0x10;
pub const REG_EXIT: u64 = 0x18;

/// Exit codes (EXIT register, or the isa-debug-exit port under QEMU).
pub const EXIT_OK: u32 = 0;
pub const EXIT_BAD_BOOT: u32 = 1;
pub const EXIT_BAD_OPTION: u32 = 2;
pub const EXIT_BAD_REGION: u32 = 3;
pub const EXIT_PANIC: u32 = 4;
/// The final check found pages whose count is wrong (lost or rolled back).
pub const EXIT_PAGE_LOST: u32 = 5;
/// A CPU exception: 0x100 + vector.
pub const EXIT_FAULT: u32 = 0x100;

/// Every line starts with this, so the host can pick them out of a shared serial log.
pub const PREFIX: &str = "baton-guest: ";

/// Where lines go and how the guest stops; set once by the boot vCPU.
#[derive(Clone, Copy)]
pub struct Sink {
    pub console: Console,
    pub exit_port: Option<u16>,
}

static mut SINK: Sink = Sink {
    console: Console::Pio(0x3f8),
    exit_port: None,
};
static PIO_LOCK: AtomicBool = AtomicBool::new(false);

/// Selects the transport. Called by the boot vCPU before the others read it.
pub fn init(sink: Sink) {
    // SAFETY: called once by vCPU 0 before it releases the other vCPUs (Release/Acquire
    // on the main.rs READY flag orders this write before their reads).
    unsafe { SINK = sink };
}

fn sink() -> Sink {
    // SAFETY: see `init`; after it, SINK is only read.
    unsafe { SINK }
}

/// A status line being built (fixed size: the guest has no allocator).
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// A new line that already holds the protocol prefix.
    pub fn new() -> Self {
        let mut l = Line {
            buf: [0; 256],
            len: 0,
        };
        let _ = l.write_str(PREFIX);
        l
    }

    /// Sends the line (a `\n` is added for byte-stream transports).
    pub fn send(mut self) {
        match sink().console {
            Console::Mmio(base) => {
                let word = ((self.len as u64) << 48) | (self.buf.as_ptr() as u64);
                // SAFETY: `base` is the status device's MMIO page (identity mapped);
                // the write is one exit, the host copies the line from our stack.
                unsafe { ((base + REG_LINE) as *mut u64).write_volatile(word) };
            }
            Console::Pio(port) => {
                if self.len < self.buf.len() {
                    self.buf[self.len] = b'\n';
                    self.len += 1;
                }
                while PIO_LOCK.swap(true, Ordering::Acquire) {
                    core::hint::spin_loop();
                }
                boot::outsb(port, &self.buf[..self.len]);
                PIO_LOCK.store(false, Ordering::Release);
            }
        }
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Leave room for the newline; a long line is cut, not dropped.
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Builds and sends one status line: `say!("status cpu={} pass={}", c, p)`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::console::Line::new();
        let _ = write!(line, $($arg)*);
        line.send();
    }};
}

/// Releases the port-I/O console lock: a fault inside a console write would
/// otherwise leave the fault reporter spinning on it forever.
pub fn force_unlock() {
    PIO_LOCK.store(false, Ordering::Release);
}

/// Tells the host the guest is finished, then stops this vCPU for good.
pub fn exit(code: u32) -> ! {
    let s = sink();
    if let Console::Mmio(base) = s.console {
        // SAFETY: the status device's EXIT register.
        unsafe { ((base + REG_EXIT) as *mut u32).write_volatile(code) };
    } else if let Some(port) = s.exit_port {
        boot::outl(port, code);
    }
    boot::halt_forever()
}

/// Bytes as text for a quoted field of a report (anything but printable ASCII, and
/// the quote itself, becomes '?').
pub struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            f.write_char(if b.is_ascii_graphic() && b != b'"' {
                b as char
            } else {
                '?'
            })?;
        }
        Ok(())
    }
}
