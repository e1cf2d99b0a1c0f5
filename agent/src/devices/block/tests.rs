use super::*;
use proptest::prelude::*;

fn regs(command: u32, sector: u64, addr: u64, length: u32) -> BlockRegs {
    BlockRegs {
        command,
        sector,
        addr,
        length,
        ..Default::default()
    }
}

#[test]
fn registers_read_back_by_halves_and_bytes() {
    let mut r = BlockRegs::default();
    for (i, b) in 0x1122_3344u32.to_le_bytes().into_iter().enumerate() {
        r.write_byte(REG_SECTOR_HI, i as u16, b);
    }
    r.write_byte(REG_SECTOR_LO, 0, 7);
    assert_eq!(r.sector, 0x1122_3344_0000_0007);
    assert_eq!(r.read_reg(REG_SECTOR_HI), 0x1122_3344);
    r.write_byte(REG_CAPACITY_LO, 0, 9);
    assert_eq!(r.capacity, 0, "capacity is read-only");
    r.status = STATUS_OK;
    r.write_byte(REG_COMMAND, 0, 2);
    assert_eq!((r.command, r.read_reg(REG_COMMAND)), (2, STATUS_OK));
}

#[test]
fn good_requests_are_accepted() {
    let ram = 1 << 20;
    assert_eq!(
        regs(CMD_READ, 2, 0x1000, 1024).request(ram),
        Ok(Request::Read {
            offset: 1024,
            addr: 0x1000,
            len: 1024
        })
    );
    assert_eq!(
        regs(CMD_WRITE, 0, ram - 512, 512).request(ram),
        Ok(Request::Write {
            offset: 0,
            len: 512
        })
    );
    assert_eq!(
        regs(CMD_FLUSH, u64::MAX, u64::MAX, 3).request(ram),
        Ok(Request::Flush)
    );
    assert_eq!(
        regs(CMD_IDENTIFY, 0, 0, 0).request(ram),
        Ok(Request::Identify)
    );
}

#[test]
fn bad_requests_are_refused() {
    let ram = 1 << 20;
    for r in [
        regs(CMD_READ, 0, 0, 0),
        regs(CMD_READ, 0, 0, 100),
        regs(CMD_READ, 0, 0, MAX_REQUEST_BYTES + 512),
        regs(CMD_WRITE, 0, ram - 511, 512),
        regs(CMD_WRITE, 0, u64::MAX - 100, 512),
        regs(CMD_READ, u64::MAX / 256, 0, 512),
        regs(9, 0, 0, 512),
    ] {
        assert!(r.request(ram).is_err(), "{r:?}");
    }
    assert!(check_disk_range(0, 512, 512).is_ok());
    assert!(check_disk_range(512, 512, 512).is_err());
    assert!(check_disk_range(u64::MAX - 10, 512, u64::MAX).is_err());
}

fn device() -> (tokio::runtime::Runtime, BlockDevices) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mem = crate::vstate::memory::create_guest_memory(1).expect("1 MiB of RAM");
    // Port 1 on loopback refuses at once: every request that gets that far fails.
    let dev = BlockDevices::new(
        "t",
        &[DiskSpec {
            nbd: "nbd://127.0.0.1:1/d".into(),
            lease: Some(stagehand_common::secret::Secret::new("SECRET").expect("token")),
        }],
        mem,
        rt.handle().clone(),
    )
    .expect("device");
    (rt, dev)
}

#[test]
fn ports_outside_the_disks_are_not_claimed() {
    let (rt, dev) = device();
    assert!(dev.claims(BLK_PORT_BASE) && dev.claims(BLK_PORT_BASE + 0x1f));
    assert!(!dev.claims(BLK_PORT_BASE - 1) && !dev.claims(BLK_PORT_BASE + 0x20));
    assert!(
        BlockDevices::new(
            "t",
            &[DiskSpec::plain("http://x")],
            crate::vstate::memory::create_guest_memory(1).expect("ram"),
            rt.handle().clone()
        )
        .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Any sequence of port accesses of any width is harmless: no panic, STATUS
    /// always one of the four values, and the device drains.
    #[test]
    fn random_port_traffic_is_harmless(
        ops in proptest::collection::vec((0u16..0x24, proptest::collection::vec(any::<u8>(), 1..5), any::<bool>()), 1..40)
    ) {
        let (_rt, dev) = device();
        for (off, bytes, write) in ops {
            let port = BLK_PORT_BASE + off;
            if write {
                dev.pio_write(port, &bytes);
            } else {
                let mut buf = bytes.clone();
                dev.pio_read(port, &mut buf);
            }
            let mut st = [0u8; 4];
            dev.pio_read(BLK_PORT_BASE + REG_COMMAND, &mut st);
            prop_assert!(u32::from_le_bytes(st) <= STATUS_ERROR);
        }
        prop_assert!(dev.quiesce(Duration::from_secs(10)).is_ok());
    }

    /// Whatever the guest puts in the registers, an accepted request lies inside
    /// guest RAM and names a representable disk range.
    #[test]
    fn accepted_requests_stay_in_bounds(
        command in 0u32..6, sector: u64, addr: u64, length: u32, ram in 1u64..(1 << 34)
    ) {
        if let Ok(Request::Read { offset, addr, len }) = regs(command, sector, addr, length).request(ram) {
            prop_assert!(addr + u64::from(len) <= ram);
            prop_assert!(offset.checked_add(u64::from(len)).is_some());
        }
        if let Ok(Request::Write { offset, len }) = regs(command, sector, addr, length).request(ram) {
            prop_assert!(addr + u64::from(len) <= ram);
            prop_assert!(offset.checked_add(u64::from(len)).is_some());
        }
    }
}
