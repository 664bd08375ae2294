//! Structure-aware: valid streams made by the real source engine (a snapshot, and a remote
//! main channel), mutated section by section and framed again with correct lengths and
//! footers, so the mutations reach the payload parsers instead of the framing checks.
//!
//! Input: byte 0 picks the stream, then 4-byte ops `[op, section, position, value]`.
#![no_main]

use baton_migration_fuzz::{join_sections, run_file, run_unix, split_sections, valid_streams};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, ops)) = data.split_first() else {
        return;
    };
    let (snap, remote) = valid_streams();
    let base = if pick & 1 == 0 { snap } else { remote };
    let Some((header, mut sections)) = split_sections(base) else {
        panic!("the engine's own stream does not split");
    };
    for op in ops.chunks_exact(4) {
        if sections.is_empty() {
            break;
        }
        let i = op[1] as usize % sections.len();
        let v = op[3];
        let (ty, p) = &mut sections[i];
        let pos = if p.is_empty() { 0 } else { (op[2] as usize * 31 + v as usize) % p.len() };
        match op[0] % 9 {
            0 if !p.is_empty() => p[pos] ^= v | 1,
            1 if !p.is_empty() => p[pos] = v,
            2 => p.insert(pos.min(p.len()), v),
            3 if !p.is_empty() => {
                p.remove(pos);
            }
            4 => p.truncate(pos),
            5 => *ty = v % 20,
            6 => {
                sections.remove(i);
            }
            7 => {
                let s = sections[i].clone();
                sections.insert(i, s);
            }
            8 => {
                let j = v as usize % sections.len();
                sections.swap(i, j);
            }
            _ => {}
        }
    }
    let stream = join_sections(&header, &sections);
    if pick & 1 == 0 {
        run_file(&stream);
    } else {
        run_unix(&stream);
    }
});
