//! The qdev test counter device behind knobs a failure test needs: another schema version,
//! a hook that blocks until the test lets it go (to hold a side in one migration state),
//! and a load that fails with the device's own words.

use baton_qdev::{
    BackendHandoff, BackendTransfer, DeviceMigrationError, EarlyOutcome, EarlySetup, Hook,
    Migratable, ReceivedBackend,
};
use baton_vmstate::VmStateDescription;

use super::relay::Latch;
use super::testdev::CounterDevice;
use super::{counter_devices, Side};

pub struct Wrapped {
    pub inner: CounterDevice,
    /// Announce this schema instead of the device's own (version mismatch tests).
    pub vmsd: Option<&'static VmStateDescription>,
    /// `prepare` waits for this latch.
    pub block_prepare: Option<Latch>,
    /// `load` waits for this latch.
    pub block_load: Option<Latch>,
    /// `load` fails with this reason.
    pub fail_load: Option<String>,
}

impl Wrapped {
    pub fn new(inner: CounterDevice) -> Wrapped {
        Wrapped {
            inner,
            vmsd: None,
            block_prepare: None,
            block_load: None,
            fail_load: None,
        }
    }

    /// Announce the counter schema at `version_id`, loading back to `minimum_version_id`.
    pub fn with_version(mut self, version_id: u32, minimum_version_id: u32) -> Wrapped {
        let mut v = self.inner.vmsd().clone();
        v.version_id = version_id;
        v.minimum_version_id = minimum_version_id;
        self.vmsd = Some(Box::leak(Box::new(v)));
        self
    }
}

/// `n` counters (as [`counters`] builds them), wrapped.
pub fn wrapped_counters(n: usize, side: Side) -> Vec<Box<dyn Migratable>> {
    counter_devices(n, side)
        .into_iter()
        .map(|c| Box::new(Wrapped::new(c)) as Box<dyn Migratable>)
        .collect()
}

/// Every device the failure harness builds is a [`Wrapped`]; look inside one.
pub fn dev(d: &mut Box<dyn Migratable>) -> &mut Wrapped {
    let p: *mut dyn Migratable = &mut **d;
    // SAFETY: the harness (`wrapped_counters`, `Spec`) only ever boxes `Wrapped` devices.
    unsafe { &mut *(p as *mut Wrapped) }
}

impl Migratable for Wrapped {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn vmsd(&self) -> &'static VmStateDescription {
        self.vmsd.unwrap_or_else(|| self.inner.vmsd())
    }
    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        self.inner.save()
    }
    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        if let Some(l) = &self.block_load {
            l.hold();
        }
        if let Some(r) = &self.fail_load {
            return Err(DeviceMigrationError::refused(
                self.inner.id(),
                Hook::Load,
                r.clone(),
            ));
        }
        // The counter's wire format is version 1; the version knob is only announced.
        let _ = version_id;
        self.inner.load(1, state)
    }
    fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> {
        Some(self)
    }
    fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> {
        Some(self)
    }
}

impl EarlySetup for Wrapped {
    fn early_vmsd(&self) -> &'static VmStateDescription {
        self.inner.early_vmsd()
    }
    fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        self.inner.save_early()
    }
    fn prepare(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        if let Some(l) = &self.block_prepare {
            l.hold();
        }
        self.inner.prepare(version_id, state)
    }
    fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError> {
        self.inner.finish(outcome)
    }
    fn discard(&mut self) {
        self.inner.discard()
    }
}

impl BackendTransfer for Wrapped {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
    fn metadata_vmsd(&self) -> &'static VmStateDescription {
        self.inner.metadata_vmsd()
    }
    fn export(&mut self) -> Result<BackendHandoff<'_>, DeviceMigrationError> {
        self.inner.export()
    }
    fn resume(&mut self) -> Result<(), DeviceMigrationError> {
        BackendTransfer::resume(&mut self.inner)
    }
    fn release(&mut self) {
        self.inner.release()
    }
    fn adopt(&mut self, received: ReceivedBackend) -> Result<(), DeviceMigrationError> {
        self.inner.adopt(received)
    }
}
