//! The shared libraries a dynamically linked VMM binary needs inside its jail: the ELF
//! interpreter (PT_INTERP) and every DT_NEEDED library, found where the host's dynamic loader
//! would find them. A static binary needs none. Only what the binary names is taken (the libc
//! the loader pulls in is named too), so the jail holds a handful of read-only files, not /lib.
//!
//! Format: the System V gABI (ELF64, little-endian x86-64): program headers, the dynamic
//! section, DT_STRTAB found through the PT_LOAD segment that maps it.

use std::path::{Path, PathBuf};

/// Where the host's loader looks on Debian-like x86-64 systems.
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}
fn c_str(b: &[u8], o: usize) -> Option<String> {
    let rest = b.get(o..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// (interpreter, needed library names) of an ELF64 image; None if it is not one we can read.
pub fn dependencies(image: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    if image.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(image, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(image, 0x36)?);
    let phnum = usize::from(u16_at(image, 0x38)?);
    // (type, offset, vaddr, filesz)
    let headers: Vec<(u32, u64, u64, u64)> = (0..phnum)
        .map(|i| {
            let h = phoff + i * phentsize;
            Some((
                u32_at(image, h)?,
                u64_at(image, h + 8)?,
                u64_at(image, h + 16)?,
                u64_at(image, h + 32)?,
            ))
        })
        .collect::<Option<_>>()?;
    let interp = headers
        .iter()
        .find(|h| h.0 == PT_INTERP)
        .and_then(|h| c_str(image, usize::try_from(h.1).ok()?));
    let Some(dynamic) = headers.iter().find(|h| h.0 == PT_DYNAMIC) else {
        return Some((interp, Vec::new()));
    };
    let entries: Vec<(u64, u64)> = (0..usize::try_from(dynamic.3).ok()? / 16)
        .map(|i| {
            let o = usize::try_from(dynamic.1).ok()? + i * 16;
            Some((u64_at(image, o)?, u64_at(image, o + 8)?))
        })
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .take_while(|(tag, _)| *tag != DT_NULL)
        .collect();
    let strtab_vaddr = entries.iter().find(|e| e.0 == DT_STRTAB)?.1;
    let load = headers
        .iter()
        .find(|h| h.0 == PT_LOAD && h.2 <= strtab_vaddr && strtab_vaddr < h.2 + h.3)?;
    let strtab = usize::try_from(strtab_vaddr - load.2 + load.1).ok()?;
    let needed = entries
        .iter()
        .filter(|e| e.0 == DT_NEEDED)
        .map(|e| c_str(image, strtab + usize::try_from(e.1).ok()?))
        .collect::<Option<Vec<_>>>()?;
    Some((interp, needed))
}

/// The host paths of the files `binary` needs to run: its interpreter and libraries.
pub fn runtime_files(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let image = std::fs::read(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let (interp, needed) =
        dependencies(&image).ok_or(format!("{}: not an x86-64 ELF binary", binary.display()))?;
    let mut files: Vec<PathBuf> = interp.into_iter().map(PathBuf::from).collect();
    for name in needed {
        let found = LIB_DIRS
            .iter()
            .map(|d| Path::new(d).join(&name))
            .find(|p| p.is_file())
            .ok_or(format!("library {name} of {} not found", binary.display()))?;
        files.push(found);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_names_its_loader_and_libc() {
        let exe = std::env::current_exe().unwrap();
        let (interp, needed) = dependencies(&std::fs::read(&exe).unwrap()).unwrap();
        assert!(interp.unwrap().contains("ld-linux"));
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "{needed:?}"
        );
        let files = runtime_files(&exe).unwrap();
        assert!(files.iter().all(|f| f.is_file()), "{files:?}");
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert_eq!(dependencies(b"#!/bin/sh\n"), None);
        assert_eq!(dependencies(b"\x7fELF\x02\x01\0\0"), None);
        assert!(runtime_files(Path::new("/etc/hostname")).is_err());
    }
}
