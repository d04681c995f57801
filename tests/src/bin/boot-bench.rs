//! boot-bench: time from starting a VMM process to a marker on its console, and the VMM's own
//! memory at that moment, over repeated runs. Used by scripts/bench; not a test.
//!
//!   boot-bench --name NAME --runs N --marker TEXT --guest-mib M -- CMD [ARGS...]
//!   boot-bench --write-tiny-guest PATH
//!
//! Prints one markdown table row: name, median / p90 / min milliseconds to the marker, and the
//! median resident memory of the VMM process excluding guest RAM (MiB). Guest RAM is recognised
//! as the mappings at least half the guest's size: a VMM maps its guest memory in one or two
//! large regions, and nothing else a VMM maps is that large.
//!
//! `--write-tiny-guest PATH` writes a purpose-built guest "kernel" instead: a PVH ELF whose
//! only work is to print [`TINY_GUEST_MARKER`] on the serial port and stop the VM. Booted in
//! place of Linux it makes the VMM's own start-up (process, KVM set-up, loading, first guest
//! instruction) the whole measured time, which a nested-emulated Linux boot otherwise hides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{anyhow, bail};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    name: String,
    runs: usize,
    marker: String,
    guest_mib: u64,
    command: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut name, mut runs, mut marker, mut guest_mib) = (None, 10, None, 0);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--name" => name = Some(value()?),
            "--runs" => {
                runs = value()?
                    .parse()
                    .map_err(|_| anyhow!("--runs: not a number"))?
            }
            "--marker" => marker = Some(value()?),
            "--guest-mib" => {
                guest_mib = value()?
                    .parse()
                    .map_err(|_| anyhow!("--guest-mib: not a number"))?
            }
            "--" => break,
            other => bail!("unknown argument {other}"),
        }
    }
    let command: Vec<String> = args.collect();
    if command.is_empty() || runs == 0 || guest_mib == 0 {
        bail!("usage: boot-bench --name N --runs R --marker M --guest-mib G -- CMD...");
    }
    Ok(Args {
        name: name.ok_or_else(|| anyhow!("--name is required"))?,
        runs,
        marker: marker.ok_or_else(|| anyhow!("--marker is required"))?,
        guest_mib,
        command,
    })
}

/// Resident KiB of `pid` outside mappings of at least `big_kib`.
fn rss_excluding_big_mappings(pid: u32, big_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut current_is_big) = (0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => {
                let size: u64 = words.next()?.parse().ok()?;
                current_is_big = size >= big_kib;
            }
            Some("Rss:") if !current_is_big => total += words.next()?.parse::<u64>().ok()?,
            _ => {}
        }
    }
    Some(total)
}

struct Sample {
    to_marker: Duration,
    own_rss_kib: u64,
}

fn one_run(args: &Args) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow!("cannot start {}: {e}", args.command[0]))?;
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = args.marker.clone().into_bytes();
    let reader = std::thread::spawn(move || {
        let (mut seen, mut buf, mut sent) = (Vec::new(), [0u8; 4096], false);
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !sent && seen.windows(marker.len()).any(|w| w == marker) {
                let _ = tx.send(Instant::now());
                sent = true;
            }
        }
        seen
    });
    let result = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(at) => {
            let own =
                rss_excluding_big_mappings(child.id(), args.guest_mib * 1024 / 2).unwrap_or(0);
            Ok(Sample {
                to_marker: at - start,
                own_rss_kib: own,
            })
        }
        Err(_) => Err(anyhow!("no marker within 120 s")),
    };
    // Let the guest finish on its own (it resets after the marker); kill a straggler.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let console = reader.join().unwrap_or_default();
    result.map_err(|e| anyhow!("{e}; console:\n{}", String::from_utf8_lossy(&console)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// The line the tiny guest prints; scripts/bench waits for it.
const TINY_GUEST_MARKER: &[u8] = b"HUSK-BOOT-MARKER\n";
/// Where the tiny guest is loaded: 16 MiB, Linux's default physical start, so it stays clear of
/// anything either VMM or its firmware (QEMU's qboot) puts in low memory.
const TINY_LOAD_ADDR: u64 = 0x100_0000;
/// PVH ELF note type: the 32-bit protected-mode entry (Xen's public/elfnote.h).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// File layout: ELF header, two program headers, the note, then code, message, IDT pointer.
const PHDRS_AT: usize = EHDR_SIZE;
const NOTE_AT: usize = PHDRS_AT + 2 * PHDR_SIZE;
/// Note header (12) + "Xen\0" (4) + an 8-byte descriptor. 8 bytes, like Linux's own note in a
/// 64-bit vmlinux: QEMU reads the descriptor of an ELF64 note as a 64-bit value.
const NOTE_SIZE: usize = 12 + 4 + 8;
const CODE_AT: usize = NOTE_AT + NOTE_SIZE;

/// 32-bit code run at the PVH entry (flat protected mode, paging off, interrupts off).
/// Returns the code for a message at `msg` and a zero IDT pointer at `idtr` (guest addresses).
#[rustfmt::skip] // keeps one instruction per line with its comment
fn tiny_guest_code(msg: u32, idtr: u32) -> Vec<u8> {
    let [m0, m1, m2, m3] = msg.to_le_bytes();
    let [i0, i1, i2, i3] = idtr.to_le_bytes();
    // Offsets in the comments; the jumps are relative to the next instruction.
    vec![
        0xfc,                   //  0: cld              (lodsb then counts upwards)
        0xbe, m0, m1, m2, m3,   //  1: mov esi, msg
        0x66, 0xba, 0xf8, 0x03, //  6: mov dx, 0x3f8    (COM1's data register)
        // loop:
        0xac,                   // 10: lodsb            (al = [esi], esi += 1)
        0x84, 0xc0,             // 11: test al, al      (the NUL ending the text)
        0x74, 0x03,             // 13: jz done          (15 + 3 = 18)
        0xee,                   // 15: out dx, al       (no LSR poll: both VMMs' UARTs
                                //                       take a byte at once)
        0xeb, 0xf8,             // 16: jmp loop         (18 - 8 = 10)
        // done:
        0xb0, 0xfe,             // 18: mov al, 0xfe
        0xe6, 0x64,             // 20: out 0x64, al     (i8042 pulse reset: ends a husk VM)
        // QEMU's microvm has no i8042, so that write is ignored there; a triple fault ends it
        // instead (with -no-reboot, as `reboot=t` does for Linux): with an empty IDT the #UD of
        // ud2, then #GP, then #DF are all undeliverable. Not int3: PVM emulates software
        // interrupts and reports an emulation failure, which leaves QEMU paused, not exited.
        0x0f, 0x01, 0x1d, i0, i1, i2, i3, // 22: lidt [idtr]  (limit 0, base 0)
        0x0f, 0x0b,             // 29: ud2              (-> triple fault)
        // halt: only reached if neither stop worked
        0xfa,                   // 31: cli
        0xf4,                   // 32: hlt
        0xeb, 0xfc,             // 33: jmp halt         (35 - 4 = 31)
    ]
}

/// The tiny guest as an x86-64 ELF64 executable: one PT_LOAD mapping the whole file at
/// [`TINY_LOAD_ADDR`] and one PT_NOTE with the PVH entry, no sections.
fn tiny_guest_elf() -> Vec<u8> {
    // Sizes are fixed by the code above; compute addresses with a dummy pass.
    let code_len = tiny_guest_code(0, 0).len();
    let msg_at = CODE_AT + code_len;
    let idtr_at = msg_at + TINY_GUEST_MARKER.len() + 1; // + the NUL that ends the loop
    let file_len = idtr_at + 6;
    let addr = |off: usize| TINY_LOAD_ADDR + off as u64;
    // Everything lies well below 4 GiB: the 32-bit casts below cannot truncate.
    let entry = addr(CODE_AT);
    let code = tiny_guest_code(addr(msg_at) as u32, addr(idtr_at) as u32);

    let mut f = Vec::with_capacity(file_len);
    // ELF header.
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little-endian, version 1, System V ABI
    f.extend_from_slice(&[0; 8]); //      padding of e_ident
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&entry.to_le_bytes()); // e_entry (the loaders use the note's entry)
    f.extend_from_slice(&(PHDRS_AT as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no section headers
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags (QEMU refuses some flags)
    f.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx

    // Program headers: (type, flags, offset, address, size, align).
    let phdrs = [
        // R+X; offset 0 and address 16 MiB agree modulo the alignment, as ELF requires.
        (PT_LOAD, 5u32, 0, TINY_LOAD_ADDR, file_len as u64, 0x1000u64),
        // QEMU aligns note fields to p_align, so it must be the notes' own 4.
        (
            PT_NOTE,
            4,
            NOTE_AT as u64,
            addr(NOTE_AT),
            NOTE_SIZE as u64,
            4,
        ),
    ];
    for (p_type, flags, offset, paddr, size, align) in phdrs {
        f.extend_from_slice(&p_type.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&offset.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&paddr.to_le_bytes()); // p_paddr (where both loaders put it)
        f.extend_from_slice(&size.to_le_bytes()); // p_filesz
        f.extend_from_slice(&size.to_le_bytes()); // p_memsz
        f.extend_from_slice(&align.to_le_bytes());
    }
    // The PVH note: namesz, descsz, type, "Xen\0", the entry.
    f.extend_from_slice(&4u32.to_le_bytes());
    f.extend_from_slice(&8u32.to_le_bytes());
    f.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&code);
    f.extend_from_slice(TINY_GUEST_MARKER);
    f.push(0);
    f.extend_from_slice(&[0; 6]); // IDT pointer: limit 0, base 0
    f
}

/// Whole milliseconds, with one decimal below 100 ms (the tiny guest's start-up on real KVM)
/// where a whole millisecond is a tenth of the figure.
fn show_ms(ms: f64) -> String {
    if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--write-tiny-guest") {
        let Some(path) = argv.get(2).filter(|_| argv.len() == 3) else {
            eprintln!("usage: boot-bench --write-tiny-guest PATH");
            std::process::exit(2);
        };
        if let Err(e) = std::fs::write(path, tiny_guest_elf()) {
            eprintln!("boot-bench: cannot write {path}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("boot-bench: {e}");
        std::process::exit(2);
    });
    let mut ms = Vec::new();
    let mut rss = Vec::new();
    for i in 0..args.runs {
        match one_run(&args) {
            Ok(s) => {
                ms.push(s.to_marker.as_secs_f64() * 1000.0);
                rss.push(s.own_rss_kib as f64 / 1024.0);
            }
            Err(e) => {
                eprintln!("boot-bench: {} run {i}: {e}", args.name);
                std::process::exit(1);
            }
        }
    }
    ms.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    println!(
        "| {} | {} | {} | {} | {} | {:.1} |",
        args.name,
        args.runs,
        show_ms(percentile(&ms, 0.5)),
        show_ms(percentile(&ms, 0.9)),
        show_ms(ms[0]),
        percentile(&rss, 0.5)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Parses the ELF the way a loader does: header, program headers, the PVH note.
    #[test]
    fn tiny_guest_is_a_pvh_elf_whose_entry_is_the_code() {
        let f = tiny_guest_elf();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!((f[4], f[5]), (2, 1), "ELF64 little-endian");
        assert_eq!(u16_at(&f, 18), 62, "x86-64");
        assert_eq!(u16_at(&f, 54) as usize, PHDR_SIZE);
        let (phoff, phnum) = (u64_at(&f, 32) as usize, u16_at(&f, 56) as usize);
        let mut load = None;
        let mut pvh_entry = None;
        for i in 0..phnum {
            let p = &f[phoff + i * PHDR_SIZE..phoff + (i + 1) * PHDR_SIZE];
            let (offset, paddr, filesz) = (u64_at(p, 8), u64_at(p, 24), u64_at(p, 32));
            match u32_at(p, 0) {
                PT_LOAD => {
                    assert_eq!(offset % u64_at(p, 48), paddr % u64_at(p, 48));
                    load = Some((offset as usize, paddr, filesz as usize));
                }
                PT_NOTE => {
                    let n = &f[offset as usize..(offset + filesz) as usize];
                    let (namesz, descsz) = (u32_at(n, 0) as usize, u32_at(n, 4));
                    assert_eq!(u32_at(n, 8), XEN_ELFNOTE_PHYS32_ENTRY);
                    assert_eq!(&n[12..12 + namesz], b"Xen\0");
                    assert_eq!(descsz, 8);
                    pvh_entry = Some(u64_at(n, 12 + namesz.next_multiple_of(4)));
                }
                other => panic!("unexpected program header type {other}"),
            }
        }
        let (offset, paddr, filesz) = load.expect("a PT_LOAD");
        assert_eq!((offset, filesz), (0, f.len()), "the whole file is loaded");
        let entry = pvh_entry.expect("a PVH note");
        assert!(
            (0x10_0000..1 << 32).contains(&entry),
            "a 32-bit entry above 1 MiB"
        );
        assert_eq!(entry, u64_at(&f, 24), "note and e_entry agree");
        // The entry is this file's code, and the code points at the message and IDT pointer.
        let at = |addr: u64| (addr - paddr) as usize + offset;
        let code = tiny_guest_code(0, 0);
        assert_eq!(f[at(entry)], 0xfc, "starts with cld");
        assert_eq!(f[at(entry) + 1], 0xbe, "then mov esi, imm32");
        let msg = u32::from_le_bytes(f[at(entry) + 2..at(entry) + 6].try_into().unwrap());
        let text = &f[at(msg.into())..];
        assert!(text.starts_with(TINY_GUEST_MARKER));
        assert_eq!(text[TINY_GUEST_MARKER.len()], 0, "NUL-terminated");
        let idtr_field = at(entry) + code.len() - 10; // lidt's disp32 (before ud2, cli, hlt, jmp)
        assert_eq!(&f[idtr_field - 3..idtr_field], &[0x0f, 0x01, 0x1d]);
        let idtr = u32::from_le_bytes(f[idtr_field..idtr_field + 4].try_into().unwrap());
        assert_eq!(&f[at(idtr.into())..at(idtr.into()) + 6], &[0; 6]);
        assert_eq!(at(idtr.into()) + 6, f.len());
    }

    #[test]
    fn milliseconds_keep_a_decimal_only_when_small() {
        assert_eq!(show_ms(9.46), "9.5");
        assert_eq!(show_ms(5244.4), "5244");
    }

    #[test]
    fn tiny_guest_code_jumps_land_on_their_labels() {
        let c = tiny_guest_code(0x1234_5678, 0x9abc_def0);
        let target = |jmp: usize| (jmp as i64 + 2 + i64::from(c[jmp + 1] as i8)) as usize;
        assert_eq!(c[10], 0xac, "loop: lodsb");
        assert_eq!((c[13], target(13)), (0x74, 18), "jz done");
        assert_eq!((c[16], target(16)), (0xeb, 10), "jmp loop");
        assert_eq!(&c[18..22], &[0xb0, 0xfe, 0xe6, 0x64], "done: i8042 reset");
        assert_eq!(&c[29..31], &[0x0f, 0x0b], "ud2");
        assert_eq!((c[33], target(33)), (0xeb, 31), "jmp halt");
        assert_eq!(&c[31..33], &[0xfa, 0xf4], "halt: cli; hlt");
        assert_eq!(c.len(), 35);
    }
}
