//! Boots the harness guest (tests/guest) under real KVM and checks the memory
//! workload: exact page contents after a bounded run, and the migration-test
//! invariant while the guest is paused mid-run. Also exercises the API a migration
//! engine uses: pause/resume, vCPU state get/set, a second mapping of the RAM memfd.
//!
//! Without /dev/kvm the tests print why they skip; with `BATON_CI=1` they fail.
//! The guest image is built on demand through xtask's library (`cargo test` from a
//! clean checkout works).

use std::time::{Duration, Instant};

mod harness;

use baton_vmm::{GuestExit, GuestRam, Vm, VmConfig};
use harness::{guest_elf, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

fn boot(cpus: usize, cmdline: &str) -> Vm {
    let mut vm = build(256 << 20, cpus, cmdline);
    let started = Instant::now();
    vm.start()
        .unwrap_or_else(|e| panic!("starting the VM: {e}"));
    let (st, ok) = vm
        .status()
        .wait_until(Duration::from_secs(20), |s| s.regions.len() == cpus);
    assert!(ok, "guest did not start within 20 s: {st:#?}");
    eprintln!(
        "start() to `start` lines on {cpus} vCPUs: {:?}",
        started.elapsed()
    );
    vm
}

fn build(memory: u64, cpus: usize, cmdline: &str) -> Vm {
    let cfg = VmConfig {
        memory,
        cpus,
        kernel: guest_elf(),
        cmdline: cmdline.into(),
        echo: false,
    };
    Vm::new(&cfg).unwrap_or_else(|e| panic!("creating the VM: {e}"))
}

/// First byte of every page of `[addr, addr + size)`.
fn page_bytes(ram: &GuestRam, addr: u64, size: u64) -> Vec<u8> {
    (0..size / PAGE)
        .map(|i| {
            ram.memory()
                .read_obj::<u8>(GuestAddress(addr + i * PAGE))
                .expect("region is RAM")
        })
        .collect()
}

/// The migration-test invariant: scanning up, the value drops by one at most once
/// (pages before the vCPU's position hold v+1, the rest v).
fn check_pattern(bytes: &[u8]) -> Result<(), String> {
    let steps: Vec<usize> = (1..bytes.len())
        .filter(|&i| bytes[i] != bytes[i - 1])
        .collect();
    match steps.as_slice() {
        [] => Ok(()),
        [i] if bytes[*i].wrapping_add(1) == bytes[i - 1] => Ok(()),
        _ => Err(format!(
            "broken pattern at pages {steps:?}: {:?}",
            &steps
                .iter()
                .map(|&i| (bytes[i - 1], bytes[i]))
                .collect::<Vec<_>>()
        )),
    }
}

#[test]
fn bounded_run_increments_every_page_exactly() {
    if !kvm_or_skip("bounded_run_increments_every_page_exactly") {
        return;
    }
    const PASSES: u64 = 1500;
    let vm = boot(2, &format!("baton.region=8M baton.passes={PASSES}"));
    let started = Instant::now();
    let exit = vm.wait_exit(Duration::from_secs(60));
    let st = vm.status().snapshot();
    assert_eq!(
        exit,
        Some(GuestExit::Code(0)),
        "guest did not finish: {st:#?}"
    );
    assert_eq!(st.failure, None);
    for cpu in 0..2 {
        assert_eq!(st.passes(cpu), PASSES, "cpu {cpu} reported {st:#?}");
    }
    eprintln!("{PASSES} passes on 2 vCPUs in {:?}", started.elapsed());

    // Read through a second, independent mapping of the memfd: it is the real RAM.
    let memfd = vm.ram().memfd().try_clone().expect("dup memfd");
    let second = GuestRam::from_memfd(memfd, vm.ram().size()).expect("map memfd again");
    for (cpu, &(addr, size)) in &st.regions {
        assert_eq!(size, 8 << 20);
        let bytes = page_bytes(&second, addr, size);
        let want = (PASSES % 256) as u8;
        let bad = bytes.iter().position(|&b| b != want);
        assert_eq!(bad, None, "cpu {cpu}: page byte != {want}");
        // Only the first byte of each page is touched.
        let other: u8 = second
            .memory()
            .read_obj(GuestAddress(addr + 1))
            .expect("RAM");
        assert_eq!(other, 0);
    }
}

#[test]
fn live_pattern_pause_resume_and_vcpu_state() {
    if !kvm_or_skip("live_pattern_pause_resume_and_vcpu_state") {
        return;
    }
    let mut vm = boot(2, "baton.region=16M baton.report_ms=20");
    let (st, ok) = vm.status().wait_until(Duration::from_secs(30), |s| {
        s.passes(0) >= 200 && s.passes(1) >= 200
    });
    assert!(ok, "fewer than 200 passes: {st:#?}");
    let t0 = Instant::now();
    let p0 = st.passes(0);

    assert!(
        vm.vcpu_state(0).is_err(),
        "state must not be readable while running"
    );
    let pause_started = Instant::now();
    vm.pause().expect("pause");
    eprintln!("pause of 2 vCPUs took {:?}", pause_started.elapsed());
    let (addr, size) = st.regions[&0];
    let before = page_bytes(vm.ram(), addr, size);
    check_pattern(&before).expect("pattern after the first pause");
    // Paused means paused: memory does not move.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        page_bytes(vm.ram(), addr, size),
        before,
        "RAM changed while paused"
    );

    // vCPU state round trip while paused.
    for cpu in 0..2 {
        let state = vm.vcpu_state(cpu).expect("get vCPU state");
        assert!(
            state.regs.rip >= 0x10_0000 && state.regs.rip < 0x20_0000,
            "{state:?}"
        );
        // The guest's own page tables (`pml4` in tests/guest/src/boot.rs), in its image.
        let image_end = vm.boot_entry().expect("booted").kernel_end;
        assert!(
            state.sregs.cr3 % 4096 == 0
                && state.sregs.cr3 >= 0x10_0000
                && state.sregs.cr3 < image_end,
            "CR3 {:#x} is not a page of the guest image (ends at {image_end:#x})",
            state.sregs.cr3
        );
        assert!(!state.msrs.is_empty());
        vm.set_vcpu_state(cpu, &state).expect("set vCPU state");
    }
    let vm_state = vm.vm_state().expect("get VM state");
    vm.set_vm_state(&vm_state).expect("set VM state");

    vm.resume().expect("resume");
    let (st, ok) = vm
        .status()
        .wait_until(Duration::from_secs(30), |s| s.passes(0) >= p0 + 200);
    assert!(ok, "guest stopped making progress after resume: {st:#?}");
    let rate = (st.passes(0) - p0) as f64 / t0.elapsed().as_secs_f64();
    vm.pause().expect("second pause");
    let after = page_bytes(vm.ram(), addr, size);
    check_pattern(&after).expect("pattern after the second pause");
    assert_ne!(before, after, "the guest's pages were not incremented");
    eprintln!(
        "cpu0: ~{rate:.0} passes/s over {} pages (both vCPUs running)",
        size / PAGE
    );
    vm.resume().expect("resume again");
    assert_eq!(vm.status().snapshot().failure, None);
    vm.stop().expect("stop");
}

#[test]
fn guest_reports_configuration_errors() {
    if !kvm_or_skip("guest_reports_configuration_errors") {
        return;
    }
    // (command line, RAM, exit code, reason)
    let cases = [
        ("baton.bogus=1", 256 << 20, 2, "bad option"),
        ("baton.region=64M", 32 << 20, 3, "region not in RAM"),
    ];
    for (cmdline, memory, code, reason) in cases {
        let mut vm = build(memory, 1, cmdline);
        vm.start().expect("start");
        let exit = vm.wait_exit(Duration::from_secs(20));
        let st = vm.status().snapshot();
        assert_eq!(exit, Some(GuestExit::Code(code)), "{cmdline}: {st:#?}");
        let failure = st.failure.unwrap_or_default();
        assert!(failure.contains(reason), "{cmdline}: {failure}");
    }
}

/// Local live update in miniature: the source pauses, a second VM adopts the RAM
/// memfd and the vCPU/VM state, and the guest carries on there.
#[test]
fn incoming_vm_continues_from_memfd_and_state() {
    if !kvm_or_skip("incoming_vm_continues_from_memfd_and_state") {
        return;
    }
    let mut source = boot(2, "baton.region=16M baton.report_ms=20");
    let (st, ok) = source.status().wait_until(Duration::from_secs(30), |s| {
        s.passes(0) >= 100 && s.passes(1) >= 100
    });
    assert!(ok, "source made no progress: {st:#?}");

    let downtime = Instant::now();
    source.pause().expect("pause source");
    let vm_state = source.vm_state().expect("VM state");
    let states: Vec<_> = (0..2)
        .map(|c| source.vcpu_state(c).expect("vCPU state"))
        .collect();
    let memfd = source.ram().memfd().try_clone().expect("dup memfd");
    let ram = GuestRam::from_memfd(memfd, source.ram().size()).expect("adopt memfd");
    let mut dest = Vm::new_incoming(ram, 2, false).expect("incoming VM");
    dest.set_vm_state(&vm_state).expect("set VM state");
    for (c, s) in states.iter().enumerate() {
        dest.set_vcpu_state(c, s).expect("set vCPU state");
    }
    source.stop().expect("stop source threads");
    dest.start().expect("start destination");
    let downtime = downtime.elapsed();

    let last = source.status().snapshot();
    let (st, ok) = dest.status().wait_until(Duration::from_secs(30), |s| {
        s.passes(0) > last.passes(0) + 100 && s.passes(1) > last.passes(1) + 100
    });
    assert!(ok, "destination did not continue: {st:#?}");
    assert_eq!(st.failure, None);
    dest.pause().expect("pause destination");
    let (addr, size) = last.regions[&0];
    check_pattern(&page_bytes(dest.ram(), addr, size)).expect("pattern on the destination");
    eprintln!(
        "in-process handover (pause, state, new VM, restore, start): {downtime:?}; \
         cpu0 pass {} -> {}",
        last.passes(0),
        st.passes(0)
    );
    dest.stop().expect("stop destination");
}
