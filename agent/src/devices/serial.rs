//! A 16550-compatible UART on COM1, transmit side only: bytes written to THR go to the
//! console log; LSR always reports the transmitter empty so polling guests never wait.
//! No interrupts are raised (IIR says "none pending").

use serde::{Deserialize, Serialize};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// The console log keeps the last this-many bytes.
pub const CONSOLE_LIMIT: usize = 1 << 20;

const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_IDLE: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;
const IIR_NONE: u8 = 0x01;
/// MSR: CTS, DSR and DCD asserted, as a connected terminal would.
const MSR_CONNECTED: u8 = 0xb0;

/// Register file of the UART; also its saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    pub fcr: u8,
}

#[derive(Debug, Default)]
pub struct Serial {
    pub regs: SerialState,
    console: std::collections::VecDeque<u8>,
}

impl Serial {
    fn dlab(&self) -> bool {
        self.regs.lcr & LCR_DLAB != 0
    }

    /// `offset` is the register number 0..8 from the base port.
    pub fn write(&mut self, offset: u16, value: u8) {
        match offset {
            0 if self.dlab() => self.regs.dll = value,
            0 => {
                if self.console.len() == CONSOLE_LIMIT {
                    self.console.pop_front();
                }
                self.console.push_back(value);
            }
            1 if self.dlab() => self.regs.dlm = value,
            1 => self.regs.ier = value & 0x0f,
            2 => self.regs.fcr = value,
            3 => self.regs.lcr = value,
            4 => self.regs.mcr = value & 0x1f,
            7 => self.regs.scr = value,
            _ => {} // LSR and MSR are read-only
        }
    }

    pub fn read(&self, offset: u16) -> u8 {
        match offset {
            0 if self.dlab() => self.regs.dll,
            0 => 0, // no receive side: RBR reads empty
            1 if self.dlab() => self.regs.dlm,
            1 => self.regs.ier,
            2 => IIR_NONE | if self.regs.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => self.regs.lcr,
            4 => self.regs.mcr,
            5 => LSR_THR_EMPTY | LSR_TX_IDLE,
            6 => MSR_CONNECTED,
            7 => self.regs.scr,
            _ => 0xff,
        }
    }

    pub fn console(&self) -> Vec<u8> {
        self.console.iter().copied().collect()
    }

    pub fn console_len(&self) -> usize {
        self.console.len()
    }

    /// Replaces the console log (on a migration target: continue the source's log).
    pub fn set_console(&mut self, bytes: &[u8]) {
        let start = bytes.len().saturating_sub(CONSOLE_LIMIT);
        self.console = bytes[start..].iter().copied().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thr_goes_to_console_and_lsr_says_empty() {
        let mut s = Serial::default();
        s.write(0, b'A');
        s.write(0, b'B');
        assert_eq!(s.console(), b"AB");
        assert_eq!(s.read(5) & LSR_THR_EMPTY, LSR_THR_EMPTY);
    }

    #[test]
    fn divisor_latch_does_not_print() {
        let mut s = Serial::default();
        s.write(3, LCR_DLAB | 3);
        s.write(0, 12);
        s.write(1, 0);
        assert_eq!(s.read(0), 12);
        s.write(3, 3);
        assert!(s.console().is_empty());
        assert_eq!(s.regs.dll, 12);
        assert_eq!(s.read(3), 3);
    }

    #[test]
    fn console_keeps_the_tail() {
        let mut s = Serial::default();
        let big: Vec<u8> = (0..CONSOLE_LIMIT + 10).map(|i| (i % 251) as u8).collect();
        s.set_console(&big);
        assert_eq!(s.console_len(), CONSOLE_LIMIT);
        s.write(0, 7);
        assert_eq!(s.console_len(), CONSOLE_LIMIT);
        assert_eq!(s.console().last(), Some(&7));
    }
}
