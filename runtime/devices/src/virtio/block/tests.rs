//! virtio-blk driven through its queue as the guest driver would, on a real image file,
//! including hostile requests. None may panic; every answerable request gets a status.

use std::path::PathBuf;

use super::request::status;
use super::*;
use crate::virtio::test_utils::{
    activate_ctx, guest_memory, CountingLine, Driver, INDIRECT, NEXT, WRITE,
};

struct TempImage(PathBuf);

impl TempImage {
    fn new(sectors: u64, fill: u8) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("husk-blk-test-{}-{id}.img", std::process::id()));
        std::fs::write(&path, vec![fill; (sectors * 512) as usize]).unwrap();
        Self(path)
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn run(dev: &mut Block, driver: &Driver<'_>) {
    let mem = driver.mem;
    dev.activate(activate_ctx(
        mem,
        vec![driver.queue()],
        CountingLine::default(),
    ))
    .unwrap();
    dev.process_queue(0).unwrap();
}

/// Status byte of the chain whose status descriptor is `desc`.
fn status_of(driver: &Driver<'_>, desc: u16) -> u8 {
    driver.read(driver.desc_addr(desc), 1)[0]
}

#[test]
fn reads_and_writes_reach_the_image_file() {
    let img = TempImage::new(16, 0xaa);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    let payload = vec![0x42u8; 1024];
    driver.chain(&[
        (&header(1, 2), 16, false),
        (&payload, 1024, false),
        (&[], 1, true),
    ]); // descs 0..3
    driver.chain(&[
        (&header(0, 1), 16, false),
        (&[], 2048, true),
        (&[], 1, true),
    ]); // descs 3..6
    let mut dev = Block::open(&img.0, false, "disk0").unwrap();

    run(&mut dev, &driver);

    let bytes = img.bytes();
    assert_eq!(&bytes[1024..2048], &payload[..], "write landed at sector 2");
    assert_eq!(bytes[1023], 0xaa);
    assert_eq!(status_of(&driver, 2), status::OK);
    assert_eq!(status_of(&driver, 5), status::OK);
    let read = driver.read(driver.desc_addr(4), 2048);
    assert_eq!(&read[..512], &[0xaa; 512][..], "sector 1 unchanged");
    assert_eq!(&read[512..1536], &payload[..], "sectors 2-3 as written");
    assert_eq!(driver.used(), vec![(0, 1), (3, 2049)]);
    let c = dev.counters().snapshot();
    assert_eq!(
        (c.requests, c.bytes_read, c.bytes_written, c.errors),
        (2, 1024, 2048, 0)
    );
}

#[test]
fn a_request_split_across_descriptors_in_any_framing_works() {
    let img = TempImage::new(4, 0x11);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    // Header in two pieces, data and status in one writable descriptor.
    let h = header(0, 0);
    driver.chain(&[(&h[..4], 4, false), (&h[4..], 12, false), (&[], 513, true)]);
    let mut dev = Block::open(&img.0, false, "").unwrap();
    run(&mut dev, &driver);
    let buf = driver.read(driver.desc_addr(2), 513);
    assert_eq!(&buf[..512], &[0x11; 512][..]);
    assert_eq!(buf[512], status::OK);
}

#[test]
fn out_of_range_and_partial_sector_requests_fail_without_io() {
    let img = TempImage::new(8, 0);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    driver.chain(&[
        (&header(1, 8), 16, false),
        (&[1; 512], 512, false),
        (&[], 1, true),
    ]); // past the end
    driver.chain(&[
        (&header(1, u64::MAX), 16, false),
        (&[1; 512], 512, false),
        (&[], 1, true),
    ]); // overflow
    driver.chain(&[
        (&header(1, 0), 16, false),
        (&[1; 100], 100, false),
        (&[], 1, true),
    ]); // not a sector
    driver.chain(&[
        (&header(0, 7), 16, false),
        (&[], 1024, true),
        (&[], 1, true),
    ]); // read past the end
    let mut dev = Block::open(&img.0, false, "").unwrap();
    run(&mut dev, &driver);
    for status_desc in [2, 5, 8, 11] {
        assert_eq!(
            status_of(&driver, status_desc),
            status::IOERR,
            "desc {status_desc}"
        );
    }
    assert!(img.bytes().iter().all(|&b| b == 0), "nothing was written");
    assert_eq!(dev.counters().snapshot().errors, 4);
}

#[test]
fn a_read_only_disk_refuses_writes_discards_and_says_so_in_its_features() {
    let img = TempImage::new(8, 7);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    driver.chain(&[
        (&header(1, 0), 16, false),
        (&[1; 512], 512, false),
        (&[], 1, true),
    ]);
    let mut dev = Block::open(&img.0, true, "").unwrap();
    assert_ne!(dev.offered_features() & feature::RO, 0);
    assert_eq!(dev.offered_features() & feature::DISCARD, 0);
    run(&mut dev, &driver);
    assert_eq!(status_of(&driver, 2), status::IOERR);
    assert!(img.bytes().iter().all(|&b| b == 7));
}

#[test]
fn flush_get_id_and_unknown_types() {
    let img = TempImage::new(8, 0);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    driver.chain(&[(&header(4, 0), 16, false), (&[], 1, true)]); // flush: descs 0,1
    driver.chain(&[(&header(8, 0), 16, false), (&[], 20, true), (&[], 1, true)]); // get-id: 2,3,4
    driver.chain(&[(&header(99, 0), 16, false), (&[], 1, true)]); // unknown: 5,6
    let mut dev = Block::open(&img.0, false, "serial-123").unwrap();
    run(&mut dev, &driver);
    assert_eq!(status_of(&driver, 1), status::OK);
    assert_eq!(&driver.read(driver.desc_addr(3), 20)[..10], b"serial-123");
    assert_eq!(status_of(&driver, 4), status::OK);
    assert_eq!(status_of(&driver, 6), status::UNSUPP);
}

#[test]
fn write_zeroes_and_discard_clear_the_range() {
    let img = TempImage::new(16, 0xff);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&n.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s
    };
    driver.chain(&[
        (&header(13, 0), 16, false),
        (&seg(2, 2, 0), 16, false),
        (&[], 1, true),
    ]);
    driver.chain(&[
        (&header(11, 0), 16, false),
        (&seg(8, 8, 0), 16, false),
        (&[], 1, true),
    ]);
    driver.chain(&[
        (&header(11, 0), 16, false),
        (&seg(15, 2, 0), 16, false),
        (&[], 1, true),
    ]); // past end
    let mut dev = Block::open(&img.0, false, "").unwrap();
    run(&mut dev, &driver);
    let bytes = img.bytes();
    assert_eq!(status_of(&driver, 2), status::OK);
    assert!(
        bytes[1024..2048].iter().all(|&b| b == 0),
        "write-zeroes cleared sectors 2-3"
    );
    assert!(bytes[..1024].iter().all(|&b| b == 0xff));
    let discard = status_of(&driver, 5);
    assert!(discard == status::OK || discard == status::UNSUPP);
    if discard == status::OK {
        assert!(
            bytes[4096..].iter().all(|&b| b == 0),
            "discarded range reads as zeros"
        );
    }
    assert_eq!(status_of(&driver, 8), status::IOERR);
}

#[test]
fn hostile_chains_never_panic_and_are_always_returned() {
    let img = TempImage::new(8, 0);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 32);
    driver.raw_chain(&[(0x4_0000, 16, NEXT, 1), (0x5_0000, 1, WRITE | NEXT, 0)]); // 0-1: loop
    driver.raw_chain(&[(u64::MAX - 4, 16, NEXT, 3), (0x5_0000, 1, WRITE, 0)]); // 2-3: header out of memory
    driver.raw_chain(&[(0x4_0000, 8, NEXT, 5), (0x5_0000, 1, WRITE, 0)]); // 4-5: short header
    driver.raw_chain(&[(0x4_0000, 16, 0, 0)]); // 6: no status byte at all
    driver.raw_chain(&[(0x5_0000, 1, WRITE | NEXT, 8), (0x4_0000, 16, 0, 0)]); // 7-8: readable after writable
    driver.raw_chain(&[(0x4_0000, 0, NEXT, 10), (0x5_0000, 0, WRITE, 0)]); // 9-10: zero lengths
    driver.raw_chain(&[(0x4_0000, 16, NEXT, 200), (0x5_0000, 1, WRITE, 0)]); // 11: next out of table
                                                                             // 12: an indirect table of 300 linked descriptors, more than a request may use.
    let table: Vec<u8> = (0..300u16)
        .flat_map(|i| {
            let (flags, next) = if i < 299 { (NEXT, i + 1) } else { (WRITE, 0) };
            let mut d = 0x4_0000u64.to_le_bytes().to_vec();
            d.extend_from_slice(&16u32.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            d
        })
        .collect();
    vm_memory::Bytes::write_slice(&mem, &table, vm_memory::GuestAddress(0x6_0000)).unwrap();
    driver.raw_chain(&[(0x6_0000, 16 * 300, INDIRECT, 0)]);
    let mut dev = Block::open(&img.0, false, "").unwrap();
    run(&mut dev, &driver);
    assert_eq!(
        driver.used().len(),
        8,
        "every chain comes back: {:?}",
        driver.used()
    );
    assert!(img.bytes().iter().all(|&b| b == 0));
    assert!(dev.counters().snapshot().errors >= 5);
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let img = TempImage::new(2048, 0);
    let dev = Block::open(&img.0, false, "").unwrap();
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    let mut blk = [0u8; 4];
    dev.read_config(20, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), 512);
}

#[test]
fn a_writable_image_cannot_be_opened_twice() {
    let img = TempImage::new(8, 0);
    let _first = Block::open(&img.0, false, "").unwrap();
    let second = Block::open(&img.0, false, "");
    assert!(second.is_err());
    assert!(
        Block::open(&img.0, true, "").is_err(),
        "no reader while a writer holds it"
    );
}

fn limited(img: &TempImage, rate: u64) -> (Block, crate::virtio::throttle::ManualClock) {
    use crate::rate_limiter::{BucketConfig, RateLimitConfig};
    let clock = crate::virtio::throttle::ManualClock::new();
    let mut dev = Block::open(&img.0, false, "disk0").unwrap();
    dev.set_clock(clock.clock());
    let dev = dev.with_rate_limit(RateLimitConfig {
        bandwidth: Some(BucketConfig { rate, burst: 0 }),
        ops: None,
    });
    (dev, clock)
}

fn read_request(driver: &mut Driver<'_>, sector: u64, len: u32) {
    driver.chain(&[
        (&header(0, sector), 16, false),
        (&[], len, true),
        (&[], 1, true),
    ]);
}

#[test]
fn an_empty_bucket_parks_the_queue_arms_the_timer_and_the_timer_resumes_it() {
    let img = TempImage::new(16, 0x11);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    for sector in 0..3 {
        read_request(&mut driver, sector * 2, 1024);
    }
    // 1024 bytes per second, a burst of one second: one request now, one per second after.
    let (mut dev, clock) = limited(&img, 1024);

    run(&mut dev, &driver);
    assert_eq!(
        driver.used().len(),
        1,
        "the second request waits for tokens"
    );
    let throttle = dev.throttle.as_ref().unwrap();
    assert!(throttle.is_armed() && throttle.is_parked(0));
    // A guest kick while parked serves nothing and needs no new timer.
    dev.process_queue(0).unwrap();
    assert_eq!(driver.used().len(), 1);
    assert!(dev.take_unfinished().is_empty());

    clock.advance(std::time::Duration::from_secs(1));
    dev.timer_expired();
    let resumed = dev.take_unfinished();
    assert!(
        resumed.contains(0),
        "the parked queue comes back as unfinished work"
    );
    dev.process_queue(0).unwrap();
    assert_eq!(driver.used().len(), 2);

    clock.advance(std::time::Duration::from_secs(1));
    dev.timer_expired();
    dev.process_queue(0).unwrap();
    assert_eq!(driver.used().len(), 3);
    assert_eq!(status_of(&driver, 8), status::OK);
}

#[test]
fn a_device_without_limits_never_arms_its_timer() {
    let img = TempImage::new(16, 0x11);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    for sector in 0..3 {
        read_request(&mut driver, sector * 2, 1024);
    }
    let mut dev = Block::open(&img.0, false, "disk0").unwrap();
    run(&mut dev, &driver);
    assert_eq!(driver.used().len(), 3);
    assert!(!dev.throttle.as_ref().unwrap().is_armed());
}

#[test]
fn lifting_the_limit_at_run_time_lets_a_parked_queue_go_on_at_once() {
    let img = TempImage::new(16, 0x11);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    for sector in 0..3 {
        read_request(&mut driver, sector * 2, 1024);
    }
    let (mut dev, _clock) = limited(&img, 1024);
    run(&mut dev, &driver);
    assert_eq!(driver.used().len(), 1);
    assert!(dev.set_rate_limit(0, Default::default()));
    assert!(!dev.set_rate_limit(1, Default::default()), "one queue only");
    dev.process_queue(0).unwrap();
    assert_eq!(driver.used().len(), 3);
}

/// An image file as a medium for a slot.
fn medium(img: &TempImage, read_only: bool) -> Box<dyn DiskBackend> {
    Box::new(RawFile::open(&img.0, read_only).unwrap())
}

#[test]
fn an_empty_slot_has_no_capacity_and_fails_every_io_request() {
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    driver.chain(&[(&header(0, 0), 16, false), (&[], 512, true), (&[], 1, true)]); // read: 0..3
    driver.chain(&[(&header(0, 0), 16, false), (&[], 1, true)]); // empty read: 3,4
    driver.chain(&[
        (&header(1, 0), 16, false),
        (&[9; 512], 512, false),
        (&[], 1, true),
    ]); // write: 5..8
    driver.chain(&[(&header(4, 0), 16, false), (&[], 1, true)]); // flush: 8,9
    let seg = [0u8; 16];
    driver.chain(&[
        (&header(13, 0), 16, false),
        (&seg, 16, false),
        (&[], 1, true),
    ]); // 10..13
    let mut dev = Block::empty_slot("slot0");
    assert!(dev.is_slot() && !dev.has_medium());
    assert_eq!(dev.capacity_sectors(), 0);
    // Features fit any later medium: writable, with discard and write-zeroes.
    let f = dev.offered_features();
    assert_eq!(f & feature::RO, 0);
    assert_ne!(f & feature::DISCARD, 0);
    assert_ne!(f & feature::WRITE_ZEROES, 0);
    assert_ne!(f & feature::FLUSH, 0);
    run(&mut dev, &driver);
    for status_desc in [2, 4, 7, 9, 12] {
        assert_eq!(
            status_of(&driver, status_desc),
            status::IOERR,
            "{status_desc}"
        );
    }
    assert!(!dev.take_config_changed());
    assert_eq!(dev.eject_medium().err(), Some(MediumError::Empty));
}

#[test]
fn a_medium_put_in_a_slot_is_served_and_ejecting_it_empties_the_slot_again() {
    let img = TempImage::new(8, 0x5a);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    let mut dev = Block::empty_slot("slot0");
    dev.activate(activate_ctx(
        &mem,
        vec![driver.queue()],
        CountingLine::default(),
    ))
    .unwrap();
    dev.insert_medium(medium(&img, false), false, "attached")
        .unwrap();
    assert!(
        dev.take_config_changed(),
        "insertion changes the config space"
    );
    assert!(!dev.take_config_changed(), "reported once");
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8);
    assert_eq!(
        dev.insert_medium(medium(&TempImage::new(1, 0), false), false, "x")
            .err(),
        Some(MediumError::Occupied)
    );

    driver.chain(&[(&header(0, 7), 16, false), (&[], 512, true), (&[], 1, true)]); // 0..3
    driver.chain(&[
        (&header(1, 0), 16, false),
        (&[1; 512], 512, false),
        (&[], 1, true),
    ]); // 3..6
    driver.chain(&[(&header(8, 0), 16, false), (&[], 20, true), (&[], 1, true)]); // 6..9
    dev.process_queue(0).unwrap();
    assert_eq!(status_of(&driver, 2), status::OK);
    assert_eq!(driver.read(driver.desc_addr(1), 512), vec![0x5a; 512]);
    assert_eq!(status_of(&driver, 5), status::OK);
    assert_eq!(&img.bytes()[..512], &[1; 512]);
    assert_eq!(&driver.read(driver.desc_addr(7), 8)[..], b"attached");

    let old = dev.eject_medium().unwrap();
    assert_eq!(old.size(), 8 * 512);
    drop(old);
    assert!(dev.take_config_changed());
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 0);
    driver.chain(&[(&header(0, 0), 16, false), (&[], 512, true), (&[], 1, true)]); // 9..12
    dev.process_queue(0).unwrap();
    assert_eq!(status_of(&driver, 11), status::IOERR);
    // The image is free again: another VM (or this slot) can take it writable.
    dev.insert_medium(medium(&img, false), false, "again")
        .unwrap();
}

#[test]
fn a_read_only_medium_in_a_slot_refuses_writes_without_announcing_ro() {
    let img = TempImage::new(8, 3);
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    driver.chain(&[
        (&header(1, 0), 16, false),
        (&[1; 512], 512, false),
        (&[], 1, true),
    ]);
    let mut dev = Block::empty_slot("slot0");
    dev.insert_medium(medium(&img, true), true, "ro").unwrap();
    assert_eq!(dev.offered_features() & feature::RO, 0);
    run(&mut dev, &driver);
    assert_eq!(status_of(&driver, 2), status::IOERR);
    assert!(img.bytes().iter().all(|&b| b == 3));
}

#[test]
fn only_slots_change_media() {
    let img = TempImage::new(8, 0);
    let mut dev = Block::open(&img.0, false, "").unwrap();
    assert!(!dev.is_slot());
    assert_eq!(dev.eject_medium().err(), Some(MediumError::NotASlot));
    let other = TempImage::new(8, 0);
    assert_eq!(
        dev.insert_medium(medium(&other, false), false, "").err(),
        Some(MediumError::NotASlot)
    );
}
