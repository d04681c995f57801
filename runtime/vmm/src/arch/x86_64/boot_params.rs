//! The Linux boot protocol "zero page" (`struct boot_params`) with the e820 map, for the 64-bit
//! boot protocol used by bzImage and by ELF kernels without a PVH entry.
//!
//! Field meanings: Linux Documentation/x86/boot.rst and Documentation/x86/zero-page.rst.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{E820Entry, ZERO_PAGE_START};

/// "HdrS": magic of a setup header.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` 0xff: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Default kernel alignment (CONFIG_PHYSICAL_ALIGN of x86-64 defconfig, 16 MiB) for a header we
/// have to make up for an ELF kernel.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `initrd_addr_max` of any 2.03+ kernel when the header does not tell.
pub const DEFAULT_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
/// Capacity of `boot_params.e820_table`.
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Errors while writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The e820 map has more entries than the zero page holds.
    #[error("e820 map has {0} entries, the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")]
    TooManyE820Entries(usize),
    /// Writing into guest memory failed.
    #[error("cannot write the zero page into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Everything the zero page says about this boot.
#[derive(Clone, Copy, Debug)]
pub struct BootParamsInput<'a> {
    /// Setup header read from a bzImage; `None` for an ELF kernel.
    pub header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command line length without the NUL.
    pub cmdline_len: usize,
    /// Initramfs `(address, size)`, if any.
    pub initrd: Option<(u64, u64)>,
    /// The guest's memory map.
    pub e820: &'a [E820Entry],
}

/// Builds the zero page.
pub fn build_boot_params(input: &BootParamsInput) -> Result<boot_params, BootParamsError> {
    if input.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootParamsError::TooManyE820Entries(input.e820.len()));
    }
    let mut params = boot_params::default();
    let mut hdr = input.header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = input.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (input.cmdline_addr >> 32) as u32;
    if input.header.is_none() {
        hdr.cmdline_size = input.cmdline_len as u32 + 1;
    }
    if let Some((addr, size)) = input.initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.hdr = hdr;
    for (slot, e) in params.e820_table.iter_mut().zip(input.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = input.e820.len() as u8;
    Ok(params)
}

/// Builds the zero page and writes it to [`ZERO_PAGE_START`].
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    input: &BootParamsInput,
) -> Result<(), BootParamsError> {
    let params = build_boot_params(input)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{e820_map, GIB};

    #[test]
    fn elf_kernel_gets_a_made_up_header_and_the_e820_map() {
        let map = e820_map(16 * GIB);
        let p = build_boot_params(&BootParamsInput {
            header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 10,
            initrd: Some((0x3000_0000, 0x12345)),
            e820: &map,
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!(({ hdr.cmd_line_ptr }, { hdr.cmdline_size }), (0x20000, 11));
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x3000_0000, 0x12345)
        );
        assert_eq!(usize::from(p.e820_entries), map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (1 << 32, 13 * GIB, 1)
        );
        assert_eq!({ p.e820_table[1].r#type }, 2);
    }

    #[test]
    fn bzimage_header_is_kept_apart_from_loader_fields() {
        let header = setup_header {
            header: HDRS_MAGIC,
            version: 0x20f,
            cmdline_size: 2047,
            xloadflags: 1,
            ..Default::default()
        };
        let p = build_boot_params(&BootParamsInput {
            header: Some(header),
            cmdline_addr: 0x20000,
            cmdline_len: 5,
            initrd: None,
            e820: &e820_map(64 << 20),
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!(
            ({ hdr.version }, { hdr.cmdline_size }, { hdr.xloadflags }),
            (0x20f, 2047, 1)
        );
        assert_eq!(({ hdr.ramdisk_image }, { hdr.type_of_loader }), (0, 0xff));
    }

    #[test]
    fn rejects_an_oversized_e820_map() {
        let map = vec![e820_map(64 << 20)[0]; 129];
        let input = BootParamsInput {
            header: None,
            cmdline_addr: 0,
            cmdline_len: 0,
            initrd: None,
            e820: &map,
        };
        assert!(matches!(
            build_boot_params(&input),
            Err(BootParamsError::TooManyE820Entries(129))
        ));
    }
}
