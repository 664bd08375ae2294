//! The CPL0 part of the guest: PVH entry, long mode, GDT/IDT/TSS, interrupt stubs.
//!
//! Why it looks like this: on this project's KVM (`kvm_pvm`) everything that is not
//! 64-bit CPL3 code runs through an instruction emulator ~3000x slower than native and
//! without SSE. So the privileged part is as short as possible and integer-only:
//!
//! * The page tables (identity map of the low 4 GiB with 2 MiB pages, user-accessible)
//!   are laid out by the assembler at build time, so the emulated stub only loads CR3.
//! * The stub runs once per vCPU. A vCPU takes its index from `cpu_count` with
//!   `lock xadd`, which selects its stacks, its TSS and its TSS descriptor in the GDT.
//!   baton-vmm starts every vCPU at the PVH entry point with EBX = start info; QEMU
//!   only starts the boot vCPU (the guest sends no INIT/SIPI).
//! * The exception stubs do not format anything at CPL0: they `iretq` to the CPL3 Rust
//!   function `guest_fault(vector, error, rip, cr2, cs, cpu)` on a per-CPU fault
//!   stack, which reports and stops.
//! * Port I/O is not possible at CPL3 on `kvm_pvm` (#GP even with IOPL=3), so
//!   `int $0x81` is a tiny CPL0 service: write bytes to a port, write a dword to a
//!   port, halt forever. The console falls back to it when no MMIO console is
//!   configured (QEMU: COM1 and isa-debug-exit). On `kvm_pvm` a software `int n` at
//!   CPL3 raises #UD instead of going through the gate, and `syscall` stays at CPL3
//!   (measured), so the #UD stub recognises `int $0x81` (bytes `cd 81` at the faulting
//!   RIP), steps over it and enters the same service. Under QEMU the gate is used.
//! * The LAPIC timer (vector 0x20) only counts `TICKS` and EOIs.
//!
//! Selectors: 0x08 kernel code, 0x10 kernel data, 0x1b user data, 0x23 user code,
//! 0x28 + 16*cpu the TSS of each vCPU.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Highest number of vCPUs the guest supports (stacks and TSS slots are static).
pub const MAX_CPUS: usize = 4;

/// `int $0x81` services (in RAX).
const SYS_OUTSB: u64 = 1;
const SYS_OUTL: u64 = 2;
const SYS_HALT: u64 = 3;

#[allow(non_upper_case_globals)]
extern "C" {
    static mut boot_ticks: u64;
    static boot_cpu_count: u32;
    static __image_end: u8;
}

/// LAPIC timer ticks since the timer was started (10 ms each).
pub fn ticks() -> u64 {
    // SAFETY: `ticks` is a naturally aligned u64 that the timer stub only changes with
    // `lock incq`; reading it atomically is sound.
    unsafe { AtomicU64::from_ptr(&raw mut boot_ticks).load(Ordering::Relaxed) }
}

/// Number of vCPUs that have entered the guest so far.
pub fn cpus_started() -> u32 {
    // SAFETY: a u32 the entry stub only changes with `lock xadd`.
    unsafe { core::ptr::read_volatile(&raw const boot_cpu_count) }
}

/// First byte after the guest image (its .bss included), page aligned.
pub fn image_end() -> u64 {
    // SAFETY: only the address of the linker symbol is taken.
    &raw const __image_end as u64
}

/// Writes `bytes` to I/O port `port`, one `outb` each (through the CPL0 service).
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: the service only reads `bytes` and writes to the port.
    unsafe {
        core::arch::asm!("int $0x81", inlateout("rax") SYS_OUTSB => _,
            inlateout("rdi") bytes.as_ptr() => _, inlateout("rsi") bytes.len() => _,
            in("rdx") port as u64,
            options(att_syntax, nostack, readonly));
    }
}

/// Writes a dword to I/O port `port` (through the CPL0 service).
pub fn outl(port: u16, value: u32) {
    // SAFETY: the service only writes to the port.
    unsafe {
        core::arch::asm!("int $0x81", inlateout("rax") SYS_OUTL => _,
            inlateout("rdi") value as u64 => _, in("rdx") port as u64,
            options(att_syntax, nostack, nomem));
    }
}

/// Stops this vCPU for good (`cli; hlt` at CPL0).
pub fn halt_forever() -> ! {
    // SAFETY: the service never returns.
    unsafe {
        core::arch::asm!("int $0x81", in("rax") SYS_HALT, options(att_syntax, noreturn));
    }
}

global_asm!(
    r#"
    .set KSTACK_SHIFT, 14
    .set USTACK_SHIFT, 16

    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %edi
    movl $1, %eax
    lock xaddl %eax, boot_cpu_count
    cmpl ${max_cpus}, %eax
    jae 9f
    movl %eax, %esi
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    lgdtl gdt_ptr
    ljmpl $0x08, $long_entry
9:  hlt
    jmp 9b

    .code64
long_entry:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl %esi, %esi
    movl %edi, %edi
    leaq 1(%rsi), %rcx
    shlq $KSTACK_SHIFT, %rcx
    leaq kstacks(%rcx), %rsp
    movq %rsi, %rax
    shlq $7, %rax
    leaq tss_array(%rax), %rbx
    movq %rsp, 4(%rbx)
    movw $104, 102(%rbx)
    movq %rsi, %rax
    shlq $4, %rax
    leaq gdt+0x28(%rax), %rcx
    movw $103, (%rcx)
    movl %ebx, %eax
    movw %ax, 2(%rcx)
    shrl $16, %eax
    movb %al, 4(%rcx)
    movb $0x89, 5(%rcx)
    movb $0, 6(%rcx)
    movb %ah, 7(%rcx)
    movq %rbx, %rax
    shrq $32, %rax
    movl %eax, 8(%rcx)
    movl $0, 12(%rcx)
    movl %esi, %eax
    shll $4, %eax
    addl $0x28, %eax
    ltr %ax
    call build_idt
    lidtq idt_ptr
    movl $0xfee00350, %eax
    movl $0x10000, (%rax)
    leaq 1(%rsi), %rcx
    shlq $USTACK_SHIFT, %rcx
    leaq ustacks-8(%rcx), %rcx
    pushq $0x1b
    pushq %rcx
    pushq $0x202
    pushq $0x23
    pushq $guest_main
    iretq

build_idt:
    xorl %r8d, %r8d
1:  movq %r8, %rdx
    shlq $4, %rdx
    leaq exc_stubs(%rdx), %r9
    movl $0x8e, %r10d
    call set_gate
    incq %r8
    cmpq $32, %r8
    jb 1b
    movl $0x20, %r8d
    leaq timer_entry(%rip), %r9
    movl $0x8e, %r10d
    call set_gate
    movl $0x81, %r8d
    leaq svc_entry(%rip), %r9
    movl $0xee, %r10d
    call set_gate
    movl $0xff, %r8d
    leaq spurious_entry(%rip), %r9
    movl $0x8e, %r10d
    call set_gate
    ret

set_gate:
    movq %r8, %r11
    shlq $4, %r11
    leaq idt(%r11), %r11
    movq %r9, %rax
    movw %ax, (%r11)
    movw $0x08, 2(%r11)
    movb $0, 4(%r11)
    movb %r10b, 5(%r11)
    shrq $16, %rax
    movw %ax, 6(%r11)
    shrq $16, %rax
    movl %eax, 8(%r11)
    movl $0, 12(%r11)
    ret

    .balign 16
exc_stubs:
    .set .Lvec, 0
    .rept 32
    .balign 16
    .if ((0x60227d00 >> .Lvec) & 1) == 0
    pushq $0
    .endif
    pushq $.Lvec
    jmp exc_common
    .set .Lvec, .Lvec + 1
    .endr

exc_common:
    cmpq $6, (%rsp)
    jne 1f
    pushq %rax
    movq 24(%rsp), %rax
    cmpw $0x81cd, (%rax)
    popq %rax
    jne 1f
    addq $2, 16(%rsp)
    addq $16, %rsp
    jmp svc_entry
1:  popq %rdi
    popq %rsi
    popq %rdx
    popq %r8
    movq %cr2, %rcx
    xorl %eax, %eax
    strw %ax
    subl $0x28, %eax
    shrl $4, %eax
    leaq 1(%rax), %r10
    shlq $KSTACK_SHIFT, %r10
    leaq fstacks-8(%r10), %r10
    movq %rax, %r9
    pushq $0x1b
    pushq %r10
    pushq $0x2
    pushq $0x23
    pushq $guest_fault
    iretq

timer_entry:
    pushq %rax
    lock incq boot_ticks(%rip)
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

spurious_entry:
    iretq

svc_entry:
    cmpq $1, %rax
    je 1f
    cmpq $2, %rax
    je 2f
    cmpq $3, %rax
    je 3f
    iretq
1:  testq %rsi, %rsi
    jz 5f
4:  movb (%rdi), %al
    outb %al, %dx
    incq %rdi
    decq %rsi
    jnz 4b
5:  iretq
2:  movl %edi, %eax
    outl %eax, %dx
    iretq
3:  cli
    hlt
    jmp 3b

    .section .data.boot, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0007
    .quad pd + 0x1007
    .quad pd + 0x2007
    .quad pd + 0x3007
    .fill 508, 8, 0
pd:
    .set .Lpg, 0
    .rept 2048
    .quad (.Lpg << 21) | 0x87
    .set .Lpg, .Lpg + 1
    .endr

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .fill {max_cpus} * 2, 8, 0
gdt_end:
    .balign 8
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
    .word 0
idt_ptr:
    .word 4095
    .quad idt

    .balign 8
    .global boot_ticks
boot_ticks:
    .quad 0
    .global boot_cpu_count
boot_cpu_count:
    .long 0

    .section .bss.boot, "aw", @nobits
    .balign 4096
idt:
    .skip 4096
tss_array:
    .skip 128 * {max_cpus}
    .balign 4096
kstacks:
    .skip {max_cpus} << KSTACK_SHIFT
fstacks:
    .skip {max_cpus} << KSTACK_SHIFT
ustacks:
    .skip {max_cpus} << USTACK_SHIFT
    .text
"#,
    max_cpus = const MAX_CPUS,
    options(att_syntax)
);
