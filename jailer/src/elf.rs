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
const DT_STRSZ: u64 = 10;

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

/// (interpreter, needed library names) of an ELF64 image read through `at(offset, len)`;
/// None if it is not one we can read. Only the headers, the dynamic section and the names are
/// read, not the whole (possibly large) file.
pub fn dependencies_with(
    at: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
) -> Option<(Option<String>, Vec<String>)> {
    let ehdr = at(0, 64)?;
    if ehdr.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = u64_at(&ehdr, 0x20)?;
    let phentsize = usize::from(u16_at(&ehdr, 0x36)?);
    let phnum = usize::from(u16_at(&ehdr, 0x38)?);
    let table = at(phoff, phentsize.checked_mul(phnum)?)?;
    // (type, offset, vaddr, filesz)
    let headers: Vec<(u32, u64, u64, u64)> = (0..phnum)
        .map(|i| {
            let h = i * phentsize;
            Some((
                u32_at(&table, h)?,
                u64_at(&table, h + 8)?,
                u64_at(&table, h + 16)?,
                u64_at(&table, h + 32)?,
            ))
        })
        .collect::<Option<_>>()?;
    let small = |len: u64| usize::try_from(len).ok().filter(|l| *l <= 1 << 20);
    let interp = match headers.iter().find(|h| h.0 == PT_INTERP) {
        Some(h) => Some(c_str(&at(h.1, small(h.3)?)?, 0)?),
        None => None,
    };
    let Some(dynamic) = headers.iter().find(|h| h.0 == PT_DYNAMIC) else {
        return Some((interp, Vec::new()));
    };
    let dyn_bytes = at(dynamic.1, small(dynamic.3)?)?;
    let entries: Vec<(u64, u64)> = (0..dyn_bytes.len() / 16)
        .map(|i| Some((u64_at(&dyn_bytes, i * 16)?, u64_at(&dyn_bytes, i * 16 + 8)?)))
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .take_while(|(tag, _)| *tag != DT_NULL)
        .collect();
    let strtab_vaddr = entries.iter().find(|e| e.0 == DT_STRTAB)?.1;
    let strsz = entries.iter().find(|e| e.0 == DT_STRSZ)?.1;
    let load = headers
        .iter()
        .find(|h| h.0 == PT_LOAD && h.2 <= strtab_vaddr && strtab_vaddr < h.2 + h.3)?;
    let strtab = at(strtab_vaddr - load.2 + load.1, small(strsz)?)?;
    let needed = entries
        .iter()
        .filter(|e| e.0 == DT_NEEDED)
        .map(|e| c_str(&strtab, usize::try_from(e.1).ok()?))
        .collect::<Option<Vec<_>>>()?;
    Some((interp, needed))
}

/// [`dependencies_with`] on an image in memory (tests).
#[cfg(test)]
pub fn dependencies(image: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    dependencies_with(&|offset, len| {
        let start = usize::try_from(offset).ok()?;
        image
            .get(start..start.checked_add(len)?)
            .map(<[u8]>::to_vec)
    })
}

/// Why the VMM's runtime files could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    #[error("{}: not an x86-64 ELF binary", .0.display())]
    NotElf(PathBuf),
    #[error("library {name} of {} not found", binary.display())]
    MissingLibrary { name: String, binary: PathBuf },
}

/// The host paths of the files `binary` needs to run: its interpreter and libraries.
pub fn runtime_files(binary: &Path) -> Result<Vec<PathBuf>, ElfError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(binary).map_err(|e| ElfError::Open(binary.to_path_buf(), e))?;
    let read = |offset: u64, len: usize| {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
    };
    let (interp, needed) =
        dependencies_with(&read).ok_or_else(|| ElfError::NotElf(binary.to_path_buf()))?;
    let mut files: Vec<PathBuf> = interp.into_iter().map(PathBuf::from).collect();
    for name in needed {
        let found = LIB_DIRS
            .iter()
            .map(|d| Path::new(d).join(&name))
            .find(|p| p.is_file())
            .ok_or_else(|| ElfError::MissingLibrary {
                name: name.clone(),
                binary: binary.to_path_buf(),
            })?;
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
