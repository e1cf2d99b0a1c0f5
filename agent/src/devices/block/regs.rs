//! The block device's register file (pure): ports, commands, statuses, and the
//! request a register write describes, bounds-checked against RAM and the disk.

use serde::{Deserialize, Serialize};

pub const BLK_PORT_BASE: u16 = 0x510;
pub const BLK_PORT_STRIDE: u16 = 0x20;
pub const MAX_DISKS: usize = 8;
pub const SECTOR_SIZE: u64 = 512;
/// Largest single request.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;

pub const REG_CAPACITY_LO: u16 = 0x00;
pub const REG_CAPACITY_HI: u16 = 0x04;
pub const REG_SECTOR_LO: u16 = 0x08;
pub const REG_SECTOR_HI: u16 = 0x0c;
pub const REG_ADDR_LO: u16 = 0x10;
pub const REG_ADDR_HI: u16 = 0x14;
pub const REG_LENGTH: u16 = 0x18;
pub const REG_COMMAND: u16 = 0x1c;

pub const CMD_READ: u32 = 1;
pub const CMD_WRITE: u32 = 2;
pub const CMD_FLUSH: u32 = 3;
pub const CMD_IDENTIFY: u32 = 4;

pub const STATUS_IDLE: u32 = 0;
pub const STATUS_BUSY: u32 = 1;
pub const STATUS_OK: u32 = 2;
pub const STATUS_ERROR: u32 = 3;

/// One disk's register file; also its saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRegs {
    pub capacity: u64,
    pub sector: u64,
    pub addr: u64,
    pub length: u32,
    /// The last command written.
    pub command: u32,
    pub status: u32,
}

/// A request as validated at command time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read { offset: u64, addr: u64, len: u32 },
    Write { offset: u64, len: u32 },
    Flush,
    Identify,
}

impl BlockRegs {
    /// The 32-bit register at `reg` (a multiple of 4 below 0x20).
    pub fn read_reg(&self, reg: u16) -> u32 {
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match reg {
            REG_CAPACITY_LO => lo(self.capacity),
            REG_CAPACITY_HI => hi(self.capacity),
            REG_SECTOR_LO => lo(self.sector),
            REG_SECTOR_HI => hi(self.sector),
            REG_ADDR_LO => lo(self.addr),
            REG_ADDR_HI => hi(self.addr),
            REG_LENGTH => self.length,
            REG_COMMAND => self.status,
            _ => u32::MAX,
        }
    }

    /// Stores byte `b` (0..4) of register `reg`; the command register only latches.
    pub(super) fn write_byte(&mut self, reg: u16, b: u16, value: u8) {
        let shift = u32::from(b) * 8;
        let set32 = |old: u32| (old & !(0xff << shift)) | (u32::from(value) << shift);
        let set_lo = |old: u64| (old & !0xffff_ffff) | u64::from(set32(old as u32));
        let set_hi = |old: u64| (old & 0xffff_ffff) | (u64::from(set32((old >> 32) as u32)) << 32);
        match reg {
            REG_SECTOR_LO => self.sector = set_lo(self.sector),
            REG_SECTOR_HI => self.sector = set_hi(self.sector),
            REG_ADDR_LO => self.addr = set_lo(self.addr),
            REG_ADDR_HI => self.addr = set_hi(self.addr),
            REG_LENGTH => self.length = set32(self.length),
            REG_COMMAND => self.command = set32(self.command),
            _ => {} // capacity is read-only
        }
    }

    /// Checks the request the registers describe against guest RAM of `ram` bytes
    /// (pure). The sector range is checked later against the disk's real size.
    pub fn request(&self, ram: u64) -> Result<Request, String> {
        let data = |this: &Self| -> Result<(u64, u32), String> {
            let len = this.length;
            if len == 0 || u64::from(len) % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
                return Err(format!(
                    "length {len} is not a multiple of {SECTOR_SIZE} in 512..={MAX_REQUEST_BYTES}"
                ));
            }
            let end = this.addr.checked_add(u64::from(len));
            if end.is_none_or(|e| e > ram) {
                return Err(format!(
                    "buffer {:#x}+{len} is outside guest RAM ({ram} bytes)",
                    this.addr
                ));
            }
            let offset = this
                .sector
                .checked_mul(SECTOR_SIZE)
                .filter(|o| o.checked_add(u64::from(len)).is_some())
                .ok_or_else(|| format!("sector {} is out of range", this.sector))?;
            Ok((offset, len))
        };
        match self.command {
            CMD_READ => {
                let (offset, len) = data(self)?;
                Ok(Request::Read {
                    offset,
                    addr: self.addr,
                    len,
                })
            }
            CMD_WRITE => {
                let (offset, len) = data(self)?;
                Ok(Request::Write { offset, len })
            }
            CMD_FLUSH => Ok(Request::Flush),
            CMD_IDENTIFY => Ok(Request::Identify),
            other => Err(format!("unknown command {other}")),
        }
    }
}

/// `offset..offset+len` must lie within a disk of `size` bytes (pure).
pub fn check_disk_range(offset: u64, len: u32, size: u64) -> Result<(), String> {
    match offset.checked_add(u64::from(len)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(format!(
            "sectors {}..+{} are past the end of the disk ({} sectors)",
            offset / SECTOR_SIZE,
            u64::from(len) / SECTOR_SIZE,
            size / SECTOR_SIZE
        )),
    }
}
