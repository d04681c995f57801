//! Guest kernel and initramfs: recognising the kernel format, loading it with linux-loader, and
//! telling a PVM guest kernel from an ordinary one.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::Bytes;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot_params::{DEFAULT_INITRD_ADDR_MAX, HDRS_MAGIC};
use crate::arch::x86_64::layout::HIMEM_START;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const SHT_STRTAB: u32 = 3;
/// bzImage: offset of the setup header magic "HdrS".
const BZ_MAGIC_OFFSET: usize = 0x202;
/// XLF_KERNEL_64: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// 64-bit entry offset into the protected-mode kernel (Documentation/x86/boot.rst).
const STARTUP_64_OFFSET: u64 = 0x200;
/// Symbol names only a PVM guest kernel has (arch/x86/kernel/pvm.c of the PVM patch set).
const PVM_GUEST_SYMBOLS: [&[u8]; 3] = [b"pvm_early_setup", b"x86_hyper_pvm", b"pvm_detect"];
/// Largest string table scanned for PVM symbols.
const MAX_STRTAB_SCAN: u64 = 64 << 20;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the kernel or the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file does not exist.
    #[error("kernel file {0} does not exist")]
    KernelNotFound(PathBuf),
    /// The initramfs file does not exist.
    #[error("initramfs file {0} does not exist")]
    InitrdNotFound(PathBuf),
    /// A file could not be opened or read.
    #[error("cannot read {0}")]
    Io(PathBuf, #[source] io::Error),
    /// Neither an x86-64 ELF nor a bzImage.
    #[error("{0} is not a kernel: {1}")]
    NotAKernel(PathBuf, &'static str),
    /// linux-loader refused the image (e.g. it does not fit in guest memory).
    #[error("cannot load kernel {0} into guest memory")]
    Load(PathBuf, #[source] linux_loader::loader::Error),
    /// The initramfs does not fit where the kernel can reach it.
    #[error("initramfs of {size} bytes does not fit below {limit:#x} after the kernel (ends at {lowest:#x}); give the VM more memory")]
    InitrdTooLarge {
        /// Initramfs size.
        size: u64,
        /// Lowest usable address.
        lowest: u64,
        /// End of the usable window.
        limit: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("cannot copy the initramfs into guest memory")]
    InitrdCopy(#[source] vm_memory::GuestMemoryError),
}

/// Kernel image formats husk boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux (PVH entry if present, otherwise 64-bit boot protocol).
    Elf,
    /// bzImage (64-bit boot protocol).
    BzImage,
}

/// An opened, recognised kernel file.
pub struct KernelFile {
    file: File,
    path: PathBuf,
    /// Its format.
    pub format: KernelFormat,
}

/// How to enter a loaded kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEntry {
    /// PVH 32-bit entry point.
    Pvh(u64),
    /// 64-bit boot protocol entry point.
    Linux64(u64),
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Entry point and protocol.
    pub entry: KernelEntry,
    /// bzImage setup header (for the zero page).
    pub header: Option<setup_header>,
    /// Lowest address free for the initramfs (past the kernel and its decompression area).
    pub free_from: u64,
    /// Highest address + 1 the kernel accepts for the initramfs.
    pub initrd_limit: u64,
}

/// Opens a kernel or initramfs: a path, or `/proc/self/fd/N` for an fd the launcher opened
/// (huskd opens them under its path policy and passes the fd, see husk_devices::host_files).
fn open(path: &Path, not_found: fn(PathBuf) -> LoaderError) -> Result<File, LoaderError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    husk_devices::host_files::open(path, &options, false).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => not_found(path.to_path_buf()),
        _ => LoaderError::Io(path.to_path_buf(), e),
    })
}

/// Recognises the format from the first bytes of an image.
pub fn detect_format(head: &[u8]) -> Result<KernelFormat, &'static str> {
    if head.len() >= 20 && &head[..4] == ELF_MAGIC {
        if head[4] != ELFCLASS64 || head[5] != ELFDATA2LSB {
            return Err("ELF file is not 64-bit little-endian");
        }
        if u16::from_le_bytes([head[18], head[19]]) != EM_X86_64 {
            return Err("ELF file is not for x86-64");
        }
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= BZ_MAGIC_OFFSET + 4
        && head[BZ_MAGIC_OFFSET..BZ_MAGIC_OFFSET + 4] == HDRS_MAGIC.to_le_bytes()
    {
        return Ok(KernelFormat::BzImage);
    }
    Err("neither an x86-64 ELF vmlinux nor a bzImage")
}

/// Opens and recognises a kernel image.
pub fn open_kernel(path: &Path) -> Result<KernelFile, LoaderError> {
    let mut file = open(path, LoaderError::KernelNotFound)?;
    let mut head = Vec::with_capacity(1024);
    (&mut file)
        .take(1024)
        .read_to_end(&mut head)
        .map_err(|e| LoaderError::Io(path.to_path_buf(), e))?;
    let format =
        detect_format(&head).map_err(|why| LoaderError::NotAKernel(path.to_path_buf(), why))?;
    Ok(KernelFile {
        file,
        path: path.to_path_buf(),
        format,
    })
}

/// Opens the initramfs and returns it with its size.
pub fn open_initrd(path: &Path) -> Result<(File, u64), LoaderError> {
    let file = open(path, LoaderError::InitrdNotFound)?;
    let size = file
        .metadata()
        .map_err(|e| LoaderError::Io(path.to_path_buf(), e))?
        .len();
    Ok((file, size))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether an ELF string table holds a PVM guest symbol.
pub fn strtab_has_pvm_symbols(strtab: &[u8]) -> bool {
    PVM_GUEST_SYMBOLS.iter().any(|s| contains(strtab, s))
}

impl KernelFile {
    /// Whether this is a PVM guest kernel: an ELF whose string tables name PVM guest code.
    /// bzImages (compressed) and stripped ELFs cannot be told apart, so they count as ordinary.
    pub fn is_pvm_guest(&mut self) -> Result<bool, LoaderError> {
        if self.format != KernelFormat::Elf {
            return Ok(false);
        }
        let io_err = |p: &Path, e| LoaderError::Io(p.to_path_buf(), e);
        let mut ehdr = [0u8; 64];
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| io_err(&self.path, e))?;
        self.file
            .read_exact(&mut ehdr)
            .map_err(|e| io_err(&self.path, e))?;
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let shoff = u64_at(&ehdr, 0x28);
        let shentsize = u64::from(u16::from_le_bytes([ehdr[0x3a], ehdr[0x3b]]));
        let shnum = u64::from(u16::from_le_bytes([ehdr[0x3c], ehdr[0x3d]]));
        if shentsize < 64 {
            return Ok(false);
        }
        for i in 0..shnum {
            let mut shdr = [0u8; 64];
            let off = shoff.saturating_add(i * shentsize);
            if self.file.seek(SeekFrom::Start(off)).is_err()
                || self.file.read_exact(&mut shdr).is_err()
            {
                return Ok(false);
            }
            let sh_type = u32::from_le_bytes([shdr[4], shdr[5], shdr[6], shdr[7]]);
            let (sh_offset, sh_size) = (u64_at(&shdr, 0x18), u64_at(&shdr, 0x20));
            if sh_type != SHT_STRTAB || sh_size > MAX_STRTAB_SCAN {
                continue;
            }
            let mut strtab = Vec::new();
            self.file
                .seek(SeekFrom::Start(sh_offset))
                .map_err(|e| io_err(&self.path, e))?;
            (&mut self.file)
                .take(sh_size)
                .read_to_end(&mut strtab)
                .map_err(|e| io_err(&self.path, e))?;
            if strtab_has_pvm_symbols(&strtab) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Loads the kernel into `mem`.
    pub fn load(&mut self, mem: &GuestMemoryMmap) -> Result<LoadedKernel, LoaderError> {
        let himem = Some(GuestAddress(HIMEM_START));
        let load_err = |p: &Path, e| LoaderError::Load(p.to_path_buf(), e);
        match self.format {
            KernelFormat::Elf => {
                let r = Elf::load(mem, None, &mut self.file, himem)
                    .map_err(|e| load_err(&self.path, e))?;
                let entry = match r.pvh_boot_cap {
                    PvhBootCapability::PvhEntryPresent(addr) => KernelEntry::Pvh(addr.0),
                    _ => KernelEntry::Linux64(r.kernel_load.0),
                };
                Ok(LoadedKernel {
                    entry,
                    header: None,
                    free_from: r.kernel_end,
                    initrd_limit: u64::from(DEFAULT_INITRD_ADDR_MAX) + 1,
                })
            }
            KernelFormat::BzImage => {
                let r = BzImage::load(mem, None, &mut self.file, himem)
                    .map_err(|e| load_err(&self.path, e))?;
                let Some(hdr) = r.setup_header else {
                    return Err(LoaderError::NotAKernel(
                        self.path.clone(),
                        "bzImage without a setup header",
                    ));
                };
                if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                    return Err(LoaderError::NotAKernel(
                        self.path.clone(),
                        "bzImage without the 64-bit entry point (boot protocol < 2.12 or no XLF_KERNEL_64)",
                    ));
                }
                // The kernel decompresses itself to pref_address and needs init_size bytes there.
                let decompressed_end = hdr.pref_address.saturating_add(u64::from(hdr.init_size));
                Ok(LoadedKernel {
                    entry: KernelEntry::Linux64(r.kernel_load.0 + STARTUP_64_OFFSET),
                    header: Some(hdr),
                    free_from: r.kernel_end.max(decompressed_end),
                    initrd_limit: u64::from(hdr.initrd_addr_max) + 1,
                })
            }
        }
    }
}

/// Where an initramfs of `size` bytes goes: as high as possible below `limit`, page aligned,
/// not below `lowest`.
pub fn initrd_address(size: u64, lowest: u64, limit: u64) -> Result<u64, LoaderError> {
    let too_large = LoaderError::InitrdTooLarge {
        size,
        lowest,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if addr < lowest.next_multiple_of(PAGE_SIZE) {
        return Err(LoaderError::InitrdTooLarge {
            size,
            lowest,
            limit,
        });
    }
    Ok(addr)
}

/// Copies the initramfs into guest memory at `addr`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    file: &mut File,
    size: u64,
    addr: u64,
) -> Result<(), LoaderError> {
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(LoaderError::InitrdCopy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_head(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = class;
        h[5] = ELFDATA2LSB;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn recognises_elf_and_bzimage() {
        assert_eq!(detect_format(&elf_head(2, 62)), Ok(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Ok(KernelFormat::BzImage));
    }

    #[test]
    fn rejects_everything_else() {
        assert!(detect_format(&elf_head(1, 62)).is_err());
        assert!(detect_format(&elf_head(2, 183)).is_err(), "aarch64");
        assert!(detect_format(b"#!/bin/sh\necho hi\n").is_err());
        assert!(detect_format(&[]).is_err());
    }

    #[test]
    fn missing_and_non_kernel_files_get_their_own_errors() {
        assert!(matches!(
            open_kernel(Path::new("/nonexistent/vmlinux")),
            Err(LoaderError::KernelNotFound(_))
        ));
        let exe = std::env::current_exe().unwrap(); // an x86-64 ELF, but see below
        assert!(open_kernel(&exe).is_ok());
        assert!(matches!(
            open_kernel(Path::new("/etc/hostname")),
            Err(LoaderError::NotAKernel(..)) | Err(LoaderError::KernelNotFound(_))
        ));
    }

    #[test]
    fn pvm_symbols_are_found_in_string_tables() {
        assert!(strtab_has_pvm_symbols(b"\0start_kernel\0pvm_early_setup\0"));
        assert!(!strtab_has_pvm_symbols(b"\0start_kernel\0kvm_guest_init\0"));
        // This test binary is an ordinary ELF.
        let mut k = open_kernel(&std::env::current_exe().unwrap()).unwrap();
        assert!(!k.is_pvm_guest().unwrap());
    }

    #[test]
    fn initrd_goes_high_and_aligned_but_not_over_the_kernel() {
        let a = initrd_address(0x1800, 0x200_0000, 0x400_0000).unwrap();
        assert_eq!(a, 0x3ff_e000);
        assert!(initrd_address(0x300_0000, 0x200_0000, 0x400_0000).is_err());
        assert!(initrd_address(u64::MAX, 0, 0x400_0000).is_err());
    }
}
