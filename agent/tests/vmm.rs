//! VMM tests on real KVM: boot the A-B sweeper, pause, dump, check; dirty logging;
//! a local save/restore round trip into a second VM; a guest that triple-faults.
//! Every test skips loudly when /dev/kvm is missing.

use std::time::{Duration, Instant};

use agent::contract::{BootSpec, MigrationSource, MigrationTarget, PAGE_SIZE};
use agent::guests::{self, AB_SWEEPER, AB_SWEEPER_LOAD_ADDR, check_ab_ram};
use agent::machine::{Machine, new_spec};

const MEM_MIB: u64 = 128;

fn kvm_ok() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: /dev/kvm missing (or not accessible)"
            );
        };
    }
    ok
}

fn boot_ab(name: &str) -> Machine {
    let spec = new_spec(
        name,
        MEM_MIB,
        1,
        BootSpec {
            flat_binary: "(embedded ab-sweeper)".into(),
            load_addr: AB_SWEEPER_LOAD_ADDR,
        },
        vec![],
    );
    Machine::boot_image(spec, AB_SWEEPER).expect("the A-B guest boots")
}

/// 'B' comes every 256 sweeps; a sweep takes 100-200 ms on this nested KVM.
const B_TIMEOUT: Duration = Duration::from_secs(180);

/// KVM tests run one at a time: on two busy cores, parallel guests starve each other.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn wait_for_a(m: &Machine) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !m.console().contains(&b'A') {
        assert!(Instant::now() < deadline, "no 'A' within 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn count(console: &[u8], byte: u8) -> usize {
    console.iter().filter(|&&b| b == byte).count()
}

/// Waits until the console holds more than `at_least` 'B's.
fn wait_for_b(m: &Machine, at_least: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let c = m.console();
        let bs = count(&c, b'B');
        if bs > at_least {
            return bs;
        }
        assert!(
            Instant::now() < deadline,
            "no new 'B' within {timeout:?}; console so far: {:?}",
            String::from_utf8_lossy(&c)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dump(m: &Machine) -> Vec<u8> {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let size = m.dump_memory(file.path()).expect("paused VM dumps");
    assert_eq!(size, MEM_MIB << 20);
    let bytes = std::fs::read(file.path()).expect("read dump");
    assert_eq!(bytes.len() as u64, MEM_MIB << 20);
    bytes
}

/// The A-B guest's sweep counter (first byte of the first page), read while it runs.
fn sweep_count(m: &Machine) -> u8 {
    use vm_memory::Bytes;
    MigrationSource::guest_memory(m)
        .read_obj(vm_memory::GuestAddress(guests::AB_START))
        .expect("read")
}

fn swept(ram: &[u8]) -> bool {
    (guests::AB_START as usize..guests::AB_END as usize)
        .step_by(4096)
        .any(|a| ram[a] != 0)
}

#[test]
fn dirty_log_reports_guest_writes_and_nothing_while_paused() {
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    let m = boot_ab("dirty1");
    wait_for_a(&m);
    m.start_dirty_log().expect("dirty log on");
    // The first page's byte counts sweeps: two increments after the log started
    // bracket one whole sweep, which writes every sweep page.
    let first = sweep_count(&m);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sweep_count(&m).wrapping_sub(first) < 2 {
        assert!(
            Instant::now() < deadline,
            "the guest did not sweep twice in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pages = m.take_dirty_pages().expect("take");
    let sweep_pages = (guests::AB_START / PAGE_SIZE)..(guests::AB_END / PAGE_SIZE);
    let missing: Vec<u64> = sweep_pages
        .clone()
        .filter(|p| pages.binary_search(p).is_err())
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "pages written but not reported: {missing:?}..."
    );
    assert!(
        pages.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    MigrationSource::pause(&m).expect("pause");
    let _ = m.take_dirty_pages().expect("take after pause");
    assert!(
        m.take_dirty_pages().expect("take").is_empty(),
        "pages dirtied while paused"
    );
    // VMM writes are tracked as well.
    use vm_memory::Bytes;
    MigrationSource::guest_memory(&m)
        .write_slice(&[1], vm_memory::GuestAddress(7 * PAGE_SIZE))
        .expect("write");
    assert_eq!(m.take_dirty_pages().expect("take"), vec![7]);
    m.stop_dirty_log().expect("dirty log off");
    assert!(m.take_dirty_pages().is_err(), "no log once stopped");
}

/// The A-B guest prints 'A' then 'B'; paused, its RAM passes the check and does not
/// change; its complete state moves into a second VM that keeps sweeping ('B's) with
/// consistent RAM. One test, because each 'B' takes 256 sweeps (tens of seconds here).
#[test]
fn ab_guest_boots_dumps_and_moves_to_a_second_vm() {
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    let vm1 = boot_ab("ab1");
    wait_for_b(&vm1, 0, B_TIMEOUT);
    let console = vm1.console();
    assert_eq!(console.first(), Some(&b'A'), "'A' comes first: {console:?}");
    assert_eq!(count(&console, b'A'), 1);

    // A running VM refuses a dump and a state save.
    assert!(vm1.dump_memory(std::path::Path::new("/dev/null")).is_err());
    assert!(vm1.save_state().is_err());
    MigrationSource::pause(&vm1).expect("pause");
    MigrationSource::pause(&vm1).expect("pause is idempotent");
    let ram = dump(&vm1);
    check_ab_ram(&ram).expect("A-B RAM is consistent");
    assert!(swept(&ram), "the guest touched its pages");
    std::thread::sleep(Duration::from_millis(200));
    assert!(dump(&vm1) == ram, "RAM changed while paused");

    let t = Instant::now();
    let state = vm1.save_state().expect("save while paused");
    eprintln!("save_state: {} bytes in {:?}", state.len(), t.elapsed());
    let spec = vm1.spec();
    assert!(!spec.cpuid.is_empty(), "CPUID recorded in the spec");
    let vm2 = Machine::create_incoming(&spec).expect("incoming VM");
    assert!(vm2.is_paused());
    use vm_memory::Bytes;
    MigrationTarget::guest_memory(&vm2)
        .write_slice(&ram, vm_memory::GuestAddress(0))
        .expect("copy RAM");
    let t = Instant::now();
    vm2.restore_state(&state).expect("restore");
    eprintln!("restore_state: {:?}", t.elapsed());
    assert_eq!(vm2.console(), vm1.console(), "console continues");
    drop(vm1); // the source is gone, as after a migration
    MigrationTarget::resume(&vm2).expect("resume VM2");
    let before = count(&vm2.console(), b'B');
    wait_for_b(&vm2, before, B_TIMEOUT);
    MigrationSource::pause(&vm2).expect("pause VM2");
    let ram2 = dump(&vm2);
    check_ab_ram(&ram2).expect("VM2 RAM consistent");
    assert!(ram2 != ram, "VM2 kept sweeping");
    assert!(vm2.guest_stop().is_none());

    // A corrupted state is refused.
    let vm3 = Machine::create_incoming(&spec).expect("incoming VM");
    assert!(vm3.restore_state(b"{not json").is_err());
}

/// Two vCPUs (the second waits for INIT/SIPI, as an AP does): boot, save, restore into
/// a second VM, and the guest goes on sweeping there with consistent RAM.
#[test]
fn two_vcpu_state_round_trip() {
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    let mut spec = new_spec(
        "smp1",
        MEM_MIB,
        2,
        BootSpec {
            flat_binary: "(embedded ab-sweeper)".into(),
            load_addr: AB_SWEEPER_LOAD_ADDR,
        },
        vec![],
    );
    let vm1 = Machine::boot_image(spec.clone(), AB_SWEEPER).expect("boots with 2 vCPUs");
    wait_for_a(&vm1);
    std::thread::sleep(Duration::from_millis(300));
    MigrationSource::pause(&vm1).expect("pause");
    let state = vm1.save_state().expect("save");
    spec = vm1.spec();
    let ram = dump(&vm1);
    check_ab_ram(&ram).expect("consistent");
    drop(vm1);
    let vm2 = Machine::create_incoming(&spec).expect("incoming");
    use vm_memory::Bytes;
    MigrationTarget::guest_memory(&vm2)
        .write_slice(&ram, vm_memory::GuestAddress(0))
        .expect("copy RAM");
    vm2.restore_state(&state).expect("restore 2 vCPUs");
    MigrationTarget::resume(&vm2).expect("resume");
    std::thread::sleep(Duration::from_millis(500));
    MigrationSource::pause(&vm2).expect("pause");
    let ram2 = dump(&vm2);
    check_ab_ram(&ram2).expect("consistent after the move");
    assert!(ram2 != ram, "the guest ran on in the second VM");
    assert!(vm2.guest_stop().is_none(), "{:?}", vm2.guest_stop());

    // A state with the wrong vCPU count is refused.
    let mut one = spec.clone();
    one.vcpus = 1;
    let vm3 = Machine::create_incoming(&one).expect("incoming");
    assert!(vm3.restore_state(&state).is_err());
}

/// Pause stops the guest at once and resume restarts it, many times over.
#[test]
fn pause_resume_is_prompt_and_repeatable() {
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    let m = boot_ab("pr1");
    wait_for_a(&m);
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(30));
        let t = Instant::now();
        MigrationSource::pause(&m).expect("pause");
        worst = worst.max(t.elapsed());
        MigrationSource::resume(&m).expect("resume");
    }
    eprintln!("worst pause latency over 20 pauses: {worst:?}");
    assert!(worst < Duration::from_secs(1), "pause took {worst:?}");
    // Still sweeping after all that, with consistent RAM.
    MigrationSource::pause(&m).expect("pause");
    let a = dump(&m);
    check_ab_ram(&a).expect("consistent");
    MigrationSource::resume(&m).expect("resume");
    std::thread::sleep(Duration::from_millis(300));
    MigrationSource::pause(&m).expect("pause");
    let b = dump(&m);
    check_ab_ram(&b).expect("consistent");
    assert!(a != b, "the guest made progress");
}

#[test]
fn throttle_slows_the_guest() {
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    let m = boot_ab("thr1");
    wait_for_a(&m);
    // The first byte of the first page counts sweeps (mod 256).
    let sweeps_in = |m: &Machine, window: Duration| {
        use vm_memory::Bytes;
        let read = |m: &Machine| -> u8 {
            MigrationSource::guest_memory(m)
                .read_obj(vm_memory::GuestAddress(guests::AB_START))
                .expect("read")
        };
        MigrationSource::pause(m).expect("pause");
        let a = read(m);
        MigrationSource::resume(m).expect("resume");
        std::thread::sleep(window);
        MigrationSource::pause(m).expect("pause");
        let b = read(m);
        MigrationSource::resume(m).expect("resume");
        b.wrapping_sub(a)
    };
    // Time held out of the guest is measured by the vCPU thread itself, so it does
    // not depend on how much CPU this busy machine gives the guest.
    let held_in = |m: &Machine, window: Duration| {
        let before = m.throttled_time();
        std::thread::sleep(window);
        m.throttled_time() - before
    };
    let window = Duration::from_millis(1000);
    assert_eq!(
        held_in(&m, window),
        Duration::ZERO,
        "no throttle, no sleeping"
    );
    m.set_throttle(90);
    std::thread::sleep(Duration::from_millis(50)); // let a throttle period start
    let held = held_in(&m, window);
    let slow = sweeps_in(&m, window);
    m.set_throttle(0);
    std::thread::sleep(Duration::from_millis(500)); // the last sleep runs out
    let after = held_in(&m, window);
    let full = sweeps_in(&m, window);
    eprintln!(
        "90% throttle: held out {held:?} of {window:?}; sweeps per second throttled {slow}, unthrottled {full}"
    );
    assert!(
        held >= window / 2 && held <= window + window / 5,
        "a 90% throttle held the vCPU out {held:?} of {window:?}"
    );
    assert_eq!(after, Duration::ZERO, "throttle 0 stops the sleeping");
}

#[test]
fn triple_fault_marks_the_guest_failed_and_nothing_crashes() {
    if !kvm_ok() {
        return;
    }
    // cli; lidt/lgdt [0x7c20] (both limit 0); set CR0.PE; jmp 0x08:0 -> #GP (no such
    // descriptor) -> no IDT -> #DF -> triple fault.
    let mut image = vec![
        0xfa, 0x0f, 0x01, 0x1e, 0x20, 0x7c, 0x0f, 0x01, 0x16, 0x20, 0x7c, 0x0f, 0x20, 0xc0, 0x0c,
        0x01, 0x0f, 0x22, 0xc0, 0xea, 0x00, 0x00, 0x08, 0x00, 0xf4,
    ];
    image.resize(0x20 + 6, 0);
    let spec = new_spec(
        "tf",
        16,
        1,
        BootSpec {
            flat_binary: "(test)".into(),
            load_addr: 0x7c00,
        },
        vec![],
    );
    let m = Machine::boot_image(spec, &image).expect("boots");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.guest_stop().is_none() {
        assert!(Instant::now() < deadline, "no triple fault seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = m.guest_stop().expect("stopped");
    assert!(stop.failed, "{stop:?}");
    MigrationSource::pause(&m).expect("a failed VM still pauses");
    MigrationSource::resume(&m).expect("and resumes (stays stopped)");
}

/// The manager's migration hooks: states move as migration expects and a failed
/// migration leaves the guest running here.
#[test]
fn manager_migration_hooks() {
    use agent::manager::{BootRequest, CreateVmRequest, ManagerError, VmLifecycle, VmManager};
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("ab.bin");
    std::fs::write(&image, AB_SWEEPER).expect("write image");
    let mgr = VmManager::new();
    let req = CreateVmRequest {
        memory_mib: MEM_MIB,
        vcpus: 1,
        boot: BootRequest {
            flat_binary: image.display().to_string(),
            load_addr: AB_SWEEPER_LOAD_ADDR,
        },
        disks: vec![],
    };
    let state = |name: &str| mgr.info(name).map(|i| i.state);
    assert_eq!(
        mgr.create("m1", &req).expect("create").state,
        VmLifecycle::Running
    );
    assert!(matches!(
        mgr.create("m1", &req),
        Err(ManagerError::AlreadyExists(_))
    ));

    let (src, was_running) = mgr.begin_outgoing("m1").expect("begin");
    assert!(was_running);
    assert_eq!(state("m1").expect("info"), VmLifecycle::Migrating);
    assert!(mgr.begin_outgoing("m1").is_err(), "one migration at a time");
    assert!(mgr.delete("m1").is_err(), "no delete while migrating");
    assert!(mgr.pause("m1").is_err(), "no API pause while migrating");
    src.pause().expect("sender pauses");
    mgr.end_outgoing("m1", false);
    assert_eq!(state("m1").expect("info"), VmLifecycle::Running);
    assert!(
        !mgr.machine("m1").expect("machine").is_paused(),
        "resumed after failure"
    );

    // A paused VM stays paused after a failed migration.
    mgr.pause("m1").expect("pause");
    let (_src, was_running) = mgr.begin_outgoing("m1").expect("begin");
    assert!(!was_running);
    mgr.end_outgoing("m1", false);
    assert_eq!(state("m1").expect("info"), VmLifecycle::Paused);

    // Incoming: a name in use is refused; a new one is registered as incoming.
    let mut spec = mgr.machine("m1").expect("machine").spec();
    assert!(mgr.create_incoming(&spec).is_err(), "name in use");
    spec.name = "m1-in".into();
    let target = mgr.create_incoming(&spec).expect("incoming");
    assert_eq!(state("m1-in").expect("info"), VmLifecycle::Incoming);
    assert!(mgr.delete("m1-in").is_err(), "no delete while incoming");
    target.resume().expect("resume");
    mgr.end_incoming("m1-in", true);
    assert_eq!(state("m1-in").expect("info"), VmLifecycle::Running);
    spec.name = "m1-gone".into();
    let _t = mgr.create_incoming(&spec).expect("incoming");
    mgr.end_incoming("m1-gone", false);
    assert!(matches!(
        mgr.info("m1-gone"),
        Err(ManagerError::NotFound(_))
    ));

    // Success removes the source.
    let _ = mgr.begin_outgoing("m1").expect("begin");
    mgr.end_outgoing("m1", true);
    assert!(matches!(mgr.info("m1"), Err(ManagerError::NotFound(_))));
    assert_eq!(mgr.list().len(), 1);
}

/// A guest that reads and writes past the end of RAM (MMIO exits) and pokes an unknown
/// port: the accesses read as all ones, are ignored, and the guest carries on.
#[test]
fn unknown_mmio_and_ports_are_ignored() {
    if !kvm_ok() {
        return;
    }
    let _serial = serial();
    #[rustfmt::skip]
    let image = [
        0xb8, 0xff, 0xff,       // mov ax, 0xffff
        0x8e, 0xd8,             // mov ds, ax
        0xa0, 0x10, 0x00,       // mov al, [0x10]      ; 0x100000, past 1 MiB of RAM
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xee,                   // out dx, al          ; prints what MMIO read
        0xa2, 0x10, 0x00,       // mov [0x10], al      ; MMIO write, ignored
        0xba, 0x34, 0x12,       // mov dx, 0x1234
        0xee,                   // out dx, al          ; unknown port, ignored
        0xec,                   // in al, dx           ; unknown port reads 0xff
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xee,                   // out dx, al
        0xb0, b'K',             // mov al, 'K'
        0xee,                   // out dx, al
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
    ];
    let spec = new_spec(
        "mmio",
        1,
        1,
        BootSpec {
            flat_binary: "(test)".into(),
            load_addr: 0x7c00,
        },
        vec![],
    );
    let m = Machine::boot_image(spec, &image).expect("boots");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.console().contains(&b'K') {
        assert!(
            Instant::now() < deadline,
            "guest did not get past the accesses"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(m.console(), vec![0xff, 0xff, b'K']);
    assert!(m.guest_stop().is_none(), "{:?}", m.guest_stop());
    MigrationSource::pause(&m).expect("a halted guest pauses");
}
