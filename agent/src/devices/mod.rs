//! Port I/O devices emulated in userspace. The PIC, IOAPIC, PIT and local APICs are
//! KVM's in-kernel ones (see `vstate::vm`); here are COM1, fast A20 (port 0x92), the
//! POST port (0x80) and a few other ports boot code pokes, and the paravirtual block
//! devices (`block`, ports 0x510 up). Any other port reads as all ones and ignores
//! writes, logged with a rate limit - never a crash.

pub mod block;
pub mod disk_uri;
pub mod serial;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use block::{BlockDevices, BlockRegs};
use serial::{COM1_BASE, COM1_LEN, Serial, SerialState};

pub const PORT_A20: u16 = 0x92;
pub const PORT_POST: u16 = 0x80;
pub const PORT_CMOS_INDEX: u16 = 0x70;
pub const PORT_CMOS_DATA: u16 = 0x71;
pub const PORT_KBC_DATA: u16 = 0x60;
pub const PORT_KBC_STATUS: u16 = 0x64;

/// 2 added the block devices' registers; version 1 (no disks) is still read.
pub const DEVICE_STATE_VERSION: u32 = 2;

/// Saved device state. The console log travels too, so a migrated guest's console
/// continues where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub version: u32,
    pub serial: SerialState,
    pub console: Vec<u8>,
    pub port92: u8,
    pub post_code: u8,
    pub cmos_index: u8,
    /// Block device registers, one entry per disk (absent in version 1).
    #[serde(default)]
    pub disks: Vec<BlockRegs>,
}

#[derive(Debug, Default)]
struct Inner {
    serial: Serial,
    port92: u8,
    post_code: u8,
    cmos_index: u8,
    unhandled: u64,
}

/// All userspace devices of one VM. vCPU threads call in on port I/O exits.
#[derive(Debug, Default)]
pub struct Devices {
    inner: Mutex<Inner>,
    /// The guest's disks (none for a VM without disks). Outside `inner`: completions
    /// on the runtime update their registers without the device lock.
    block: Option<Arc<BlockDevices>>,
}

fn is_com1(port: u16) -> bool {
    (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port)
}

impl Devices {
    /// Devices with these disks.
    pub fn with_block(block: Option<Arc<BlockDevices>>) -> Self {
        Devices {
            inner: Mutex::default(),
            block,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("device lock is never poisoned (no panics inside)")
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if let Some(b) = &self.block
            && b.claims(port)
        {
            return b.pio_write(port, data);
        }
        let mut d = self.lock();
        let Some(&value) = data.first() else { return };
        match port {
            p if is_com1(p) => {
                // Wider accesses write consecutive registers, as on real hardware.
                for (i, &b) in data.iter().enumerate() {
                    d.serial.write(p - COM1_BASE + i as u16, b);
                }
            }
            // Bit 0 (fast reset) is not emulated: a reset through 0x92 is ignored.
            PORT_A20 => d.port92 = value & !1,
            PORT_POST => d.post_code = value,
            PORT_CMOS_INDEX => d.cmos_index = value & 0x7f,
            PORT_CMOS_DATA | PORT_KBC_DATA | PORT_KBC_STATUS => {}
            _ => {
                d.unhandled += 1;
                if d.unhandled < 10 || d.unhandled.is_multiple_of(1000) {
                    tracing::warn!(
                        port = format_args!("{port:#x}"),
                        value,
                        count = d.unhandled,
                        "write to unhandled port ignored"
                    );
                }
            }
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(b) = &self.block
            && b.claims(port)
        {
            return b.pio_read(port, data);
        }
        let mut d = self.lock();
        for (i, out) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *out = match p {
                p if is_com1(p) => d.serial.read(p - COM1_BASE),
                PORT_A20 => d.port92,
                PORT_POST => d.post_code,
                PORT_CMOS_INDEX => d.cmos_index,
                // No RTC: every CMOS register reads 0 (valid BCD, "no diskette").
                PORT_CMOS_DATA => 0,
                // Keyboard controller: nothing to read, input buffer empty, so A20
                // polling loops through the 8042 finish.
                PORT_KBC_DATA | PORT_KBC_STATUS => 0,
                _ => {
                    if i == 0 {
                        d.unhandled += 1;
                        if d.unhandled < 10 || d.unhandled.is_multiple_of(1000) {
                            tracing::warn!(
                                port = format_args!("{port:#x}"),
                                count = d.unhandled,
                                "read of unhandled port (reads as all ones)"
                            );
                        }
                    }
                    0xff
                }
            };
        }
    }

    pub fn console(&self) -> Vec<u8> {
        self.lock().serial.console()
    }

    pub fn save_state(&self) -> DeviceState {
        let d = self.lock();
        DeviceState {
            version: DEVICE_STATE_VERSION,
            serial: d.serial.regs.clone(),
            console: d.serial.console(),
            port92: d.port92,
            post_code: d.post_code,
            cmos_index: d.cmos_index,
            disks: self
                .block
                .as_ref()
                .map(|b| b.save_state())
                .unwrap_or_default(),
        }
    }

    pub fn restore_state(&self, state: &DeviceState) -> Result<(), String> {
        if state.version != DEVICE_STATE_VERSION && state.version != 1 {
            return Err(format!(
                "device state version {} is not supported (this agent reads {DEVICE_STATE_VERSION})",
                state.version
            ));
        }
        match &self.block {
            Some(b) if state.version >= 2 => b.restore_state(&state.disks)?,
            // Version 1 had no disks: their registers start fresh.
            Some(_) => {}
            None if state.disks.is_empty() => {}
            None => {
                return Err(format!(
                    "device state has {} disks, this VM none",
                    state.disks.len()
                ));
            }
        }
        let mut d = self.lock();
        d.serial.regs = state.serial.clone();
        d.serial.set_console(&state.console);
        d.port92 = state.port92;
        d.post_code = state.post_code;
        d.cmos_index = state.cmos_index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port92_reads_back_and_unknown_ports_are_harmless() {
        let dev = Devices::default();
        dev.pio_write(PORT_A20, &[0x02]);
        let mut b = [0u8; 1];
        dev.pio_read(PORT_A20, &mut b);
        assert_eq!(b[0], 0x02);
        dev.pio_write(0x1234, &[1, 2]);
        let mut w = [0u8; 2];
        dev.pio_read(0x1234, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    #[test]
    fn state_round_trip() {
        let a = Devices::default();
        a.pio_write(COM1_BASE, b"h");
        a.pio_write(COM1_BASE + 7, &[0x5a]);
        a.pio_write(PORT_A20, &[2]);
        let state = a.save_state();
        let b = Devices::default();
        b.restore_state(&state).expect("same version");
        assert_eq!(b.save_state(), state);
        assert_eq!(b.console(), b"h");
        let mut bad = state.clone();
        bad.version = 99;
        assert!(b.restore_state(&bad).is_err());

        // Version 1 (before block devices) has no `disks` and is still read.
        let mut v1 = serde_json::to_value(&state).expect("to json");
        v1["version"] = 1.into();
        v1.as_object_mut().expect("object").remove("disks");
        let v1: DeviceState = serde_json::from_value(v1).expect("version 1 parses");
        assert!(v1.disks.is_empty());
        let c = Devices::default();
        c.restore_state(&v1).expect("version 1 restores");
        assert_eq!(c.console(), b"h");
        // Disk registers for a VM without disks are refused.
        let mut extra = state;
        extra.disks = vec![block::BlockRegs::default()];
        assert!(c.restore_state(&extra).is_err());
    }
}
