#![allow(clippy::unwrap_used)]
use std::sync::{Arc, Mutex};

use super::discard::DiscardError;
use super::*;
use crate::virtio::test_utils::{guest_memory, CountingLine, Driver, WRITE};
use crate::virtio::VirtioInterrupt;

/// Records each discarded range; refuses ranges past 1 MiB (the test memory's end).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(u64, u64)>>>);

impl PageDiscard for Recorder {
    fn discard(&mut self, _: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), DiscardError> {
        if addr.checked_add(len).is_none_or(|end| end > 0x10_0000) {
            return Err(DiscardError::NotRam { addr, len });
        }
        self.0.lock().unwrap().push((addr, len));
        Ok(())
    }
}

impl Recorder {
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.0.lock().unwrap().clone()
    }
}

const ALL: u64 =
    features::VERSION_1 | feature::STATS_VQ | feature::PAGE_REPORTING | feature::DEFLATE_ON_OOM;

/// A balloon activated with `acked` features on `queues` (by index).
fn active(
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
    acked: u64,
    line: CountingLine,
) -> (Balloon, Recorder) {
    let recorder = Recorder::default();
    let mut balloon = Balloon::new(BalloonFeatures::default(), Box::new(recorder.clone()));
    balloon
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: Arc::new(VirtioInterrupt::new(Box::new(line))),
            acked_features: acked,
        })
        .unwrap();
    (balloon, recorder)
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn stat_bytes(stats: &[(u16, u64)]) -> Vec<u8> {
    stats
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

fn not_ready() -> Queue {
    Queue::new(QUEUE_SIZE).unwrap()
}

#[test]
fn offers_what_it_is_configured_with() {
    let all = Balloon::new(BalloonFeatures::default(), Box::new(Recorder::default()));
    assert_eq!(all.offered_features() & ALL, ALL);
    assert_eq!(all.device_type(), device_id::BALLOON);
    let none = Balloon::new(
        BalloonFeatures {
            stats: false,
            free_page_reporting: false,
            deflate_on_oom: false,
        },
        Box::new(Recorder::default()),
    );
    assert_eq!(
        none.offered_features()
            & (feature::STATS_VQ | feature::PAGE_REPORTING | feature::DEFLATE_ON_OOM),
        0
    );
}

#[test]
fn queues_are_numbered_by_the_negotiated_features_as_linux_does() {
    let base = features::VERSION_1;
    assert_eq!(role_of(base, 2), None);
    assert_eq!(role_of(base | feature::STATS_VQ, 2), Some(Role::Stats));
    assert_eq!(
        role_of(base | feature::PAGE_REPORTING, 2),
        Some(Role::Reporting)
    );
    assert_eq!(role_of(ALL, 3), Some(Role::Reporting));
    assert_eq!(role_of(ALL, 4), None);
}

#[test]
fn inflated_pages_are_discarded_in_runs_and_deflated_ones_only_counted() {
    let mem = guest_memory();
    let mut inflate = Driver::new_at(&mem, 16, 0x1000, 0x4_0000);
    let mut deflate = Driver::new_at(&mem, 16, 0x2000, 0x8_0000);
    // Frames 0xc0..0xc3 and 0xd0, 0xd1, then one alone.
    inflate.chain(&[(
        &pfn_bytes(&[0xc0, 0xc1, 0xc2, 0xc3, 0xd0, 0xd1, 0xe5]),
        28,
        false,
    )]);
    deflate.chain(&[(&pfn_bytes(&[0xc0, 0xc1]), 8, false)]);
    let line = CountingLine::default();
    let (mut balloon, recorder) = active(
        &mem,
        vec![inflate.queue(), deflate.queue(), not_ready(), not_ready()],
        features::VERSION_1,
        line.clone(),
    );

    balloon.process_queue(0).unwrap();
    balloon.process_queue(1).unwrap();

    assert_eq!(
        recorder.ranges(),
        [(0xc_0000, 0x4000), (0xd_0000, 0x2000), (0xe_5000, 0x1000)]
    );
    assert_eq!(inflate.used().len(), 1);
    assert_eq!(deflate.used().len(), 1);
    let report = balloon.report();
    assert_eq!((report.inflated_pages, report.deflated_pages), (7, 2));
    assert!(line.0.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}

#[test]
fn frames_outside_ram_are_errors_and_nothing_else_happens() {
    let mem = guest_memory();
    let mut inflate = Driver::new_at(&mem, 16, 0x1000, 0x4_0000);
    inflate.chain(&[(&pfn_bytes(&[0x100, u32::MAX, 0x10]), 12, false)]);
    // A chain whose buffer lies outside guest memory, and one written the wrong way round.
    inflate.raw_chain(&[(u64::MAX - 8, 64, 0, 0)]);
    inflate.raw_chain(&[(0x4_0000, 3, WRITE, 0)]);
    let (mut balloon, recorder) = active(
        &mem,
        vec![inflate.queue(), not_ready(), not_ready(), not_ready()],
        features::VERSION_1,
        CountingLine::default(),
    );

    balloon.process_queue(0).unwrap();

    assert_eq!(recorder.ranges(), [(0x1_0000, 0x1000)]);
    assert_eq!(inflate.used().len(), 3, "every chain goes back");
    assert!(balloon.counters().snapshot().errors >= 3);
}

#[test]
fn a_chain_never_names_more_than_the_bound() {
    let mem = guest_memory();
    let mut inflate = Driver::new_at(&mem, 16, 0x1000, 0x4_0000);
    let pfns: Vec<u32> = (0..(MAX_PFNS_PER_CHAIN as u32 + 100))
        .map(|i| i * 2)
        .collect();
    let bytes = pfn_bytes(&pfns);
    inflate.chain(&[(&bytes, bytes.len() as u32, false)]);
    let (mut balloon, _) = active(
        &mem,
        vec![inflate.queue(), not_ready(), not_ready(), not_ready()],
        features::VERSION_1,
        CountingLine::default(),
    );
    balloon.process_queue(0).unwrap();
    assert_eq!(balloon.report().inflated_pages, MAX_PFNS_PER_CHAIN as u64);
}

#[test]
fn the_stats_buffer_is_held_until_fresh_numbers_are_asked_for() {
    let mem = guest_memory();
    let mut stats_driver = Driver::new_at(&mem, 16, 0x3000, 0xc_0000);
    let first = stat_bytes(&[(4, 1000), (5, 4000), (6, 3000)]);
    let head = stats_driver.chain(&[(&first, first.len() as u32, false)]);
    let line = CountingLine::default();
    let (mut balloon, _) = active(
        &mem,
        vec![not_ready(), not_ready(), stats_driver.queue(), not_ready()],
        features::VERSION_1 | feature::STATS_VQ,
        line.clone(),
    );

    balloon.process_queue(2).unwrap();
    let report = balloon.report();
    assert_eq!(report.stats, [(4, 1000), (5, 4000), (6, 3000)]);
    assert!(report.stats_enabled && !report.reporting_enabled);
    assert!(stats_driver.used().is_empty(), "the buffer is held");

    balloon.request_stats().unwrap();
    assert_eq!(stats_driver.used(), [(u32::from(head), 0)]);
    balloon.request_stats().unwrap();
    assert_eq!(
        stats_driver.used().len(),
        1,
        "nothing held, nothing returned"
    );

    let second = stat_bytes(&[(4, 900)]);
    stats_driver.chain(&[(&second, second.len() as u32, false)]);
    balloon.process_queue(2).unwrap();
    assert_eq!(balloon.report().stats, [(4, 900)]);
}

#[test]
fn a_stats_buffer_queued_before_activation_is_taken_at_activation() {
    // Linux adds its first stats buffer and kicks before DRIVER_OK; that kick is lost.
    let mem = guest_memory();
    let mut stats_driver = Driver::new_at(&mem, 16, 0x3000, 0xc_0000);
    let first = stat_bytes(&[(5, 4000)]);
    stats_driver.chain(&[(&first, first.len() as u32, false)]);
    let (balloon, _) = active(
        &mem,
        vec![not_ready(), not_ready(), stats_driver.queue(), not_ready()],
        features::VERSION_1 | feature::STATS_VQ,
        CountingLine::default(),
    );
    assert_eq!(balloon.report().stats, [(5, 4000)]);
    assert!(stats_driver.used().is_empty(), "held for the next request");
}

#[test]
fn an_inflate_queued_before_activation_is_served_at_activation() {
    // After a restore, an inflate the guest kicked just before the snapshot is available again
    // with no kick to come: activation serves it, or the guest's balloon worker waits forever.
    let mem = guest_memory();
    let mut inflate = Driver::new_at(&mem, 16, 0x1000, 0x4_0000);
    inflate.chain(&[(&pfn_bytes(&[0xc0, 0xc1]), 8, false)]);
    let (balloon, recorder) = active(
        &mem,
        vec![inflate.queue(), not_ready(), not_ready(), not_ready()],
        features::VERSION_1,
        CountingLine::default(),
    );
    assert_eq!(recorder.ranges(), [(0xc_0000, 0x2000)]);
    assert_eq!(inflate.used().len(), 1);
    assert_eq!(balloon.report().inflated_pages, 2);
}

#[test]
fn free_page_reports_are_discarded_range_by_range() {
    let mem = guest_memory();
    let mut reporting = Driver::new_at(&mem, 16, 0x3000, 0xc_0000);
    // Two ranges in one chain, device-writable as Linux queues them, then one outside RAM.
    reporting.raw_chain(&[
        (0x2_0000, 0x2_0000, WRITE | 1, 1),
        (0x8_0000, 0x1000, WRITE, 0),
    ]);
    reporting.raw_chain(&[(0x20_0000, 0x1000, WRITE, 0)]);
    let (mut balloon, recorder) = active(
        &mem,
        vec![not_ready(), not_ready(), reporting.queue(), not_ready()],
        features::VERSION_1 | feature::PAGE_REPORTING,
        CountingLine::default(),
    );

    balloon.process_queue(2).unwrap();

    assert_eq!(
        recorder.ranges(),
        [(0x2_0000, 0x2_0000), (0x8_0000, 0x1000)]
    );
    assert_eq!(reporting.used().len(), 2);
    assert_eq!(balloon.report().reported_bytes, 0x2_1000);
    assert_eq!(balloon.counters().snapshot().errors, 1);
}

#[test]
fn the_target_is_config_space_and_only_actual_is_writable() {
    let mut balloon = Balloon::new(BalloonFeatures::default(), Box::new(Recorder::default()));
    balloon.set_target_pages(0x1234);
    assert!(balloon.take_config_changed());
    assert!(!balloon.take_config_changed());
    balloon.set_target_pages(0x1234);
    assert!(!balloon.take_config_changed(), "no change, no interrupt");

    balloon.write_config(0, &[0xff; 4]);
    balloon.write_config(4, &7u32.to_le_bytes());
    balloon.write_config(6, &[1]);
    let mut config = [0u8; 8];
    balloon.read_config(0, &mut config);
    assert_eq!(&config[..4], &0x1234u32.to_le_bytes());
    assert_eq!(&config[4..], &0x1_0007u32.to_le_bytes());
    balloon.write_config(u64::MAX, &[1, 2, 3]);
    assert_eq!(balloon.report().actual_pages, 0x1_0007);
}

#[test]
fn target_and_actual_survive_a_snapshot_and_damage_is_refused() {
    let mut balloon = Balloon::new(BalloonFeatures::default(), Box::new(Recorder::default()));
    balloon.set_target_pages(100);
    balloon.write_config(4, &60u32.to_le_bytes());
    let saved = balloon.save_device_state();

    let mut fresh = Balloon::new(BalloonFeatures::default(), Box::new(Recorder::default()));
    fresh.restore_device_state(&saved).unwrap();
    let report = fresh.report();
    assert_eq!((report.target_pages, report.actual_pages), (100, 60));
    assert!(fresh.restore_device_state(&[0xff, 0xff, 0xff]).is_err());
    fresh.restore_device_state(&[]).unwrap();
}

#[test]
fn runs_join_consecutive_frames_only() {
    assert_eq!(runs(&[]), []);
    assert_eq!(
        runs(&[5, 6, 7, 3, 4, u32::MAX]),
        [(5, 3), (3, 2), (u32::MAX, 1)]
    );
    assert_eq!(runs(&[9, 8]), [(9, 1), (8, 1)]);
}
