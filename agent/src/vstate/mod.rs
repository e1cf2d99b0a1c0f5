//! KVM state, Firecracker-style: `vm` (VM fd, RAM slot, irqchip, PIT, dirty log, VM
//! state), `vcpu` (vCPU fds, their state, the run-loop threads), `memory` (guest RAM
//! and dirty bitmaps).

pub mod memory;
pub mod vcpu;
pub mod vm;
