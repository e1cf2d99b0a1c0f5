//! The receiver's pure state machine: which frame may come next, and how long it may
//! be, in each state (checked from the header, before any allocation).

use crate::contract::VmSpec;
use crate::migration::protocol::{self, Command, SwitchoverMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    AwaitHello,
    AwaitConfig,
    Memory,
    Data,
    StateReceived,
    Verified,
    /// Coordinated mode: the go-ahead came and the disks are set; Complete may follow.
    GoAhead,
    Running,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cmd:?} is not allowed in state {state:?}")]
pub struct OutOfOrder {
    pub state: ReceiverState,
    pub cmd: Command,
}

impl ReceiverState {
    /// The state after `cmd`, assuming its checks (auth, config, digests) pass; the
    /// shell moves to `Closed` itself when they fail. `mode` is the switchover mode the
    /// session's Config declared (`Auto` before Config and on data connections).
    pub fn next(self, cmd: Command, mode: SwitchoverMode) -> Result<ReceiverState, OutOfOrder> {
        use Command as C;
        use ReceiverState as S;
        use SwitchoverMode as M;
        Ok(match (self, cmd, mode) {
            (S::AwaitHello, C::Hello, _) => S::AwaitConfig,
            (S::AwaitConfig, C::Config, _) => S::Memory,
            (S::AwaitConfig, C::Join, _) => S::Data,
            (S::Memory, C::Memory | C::Sparse | C::Sync, _) => S::Memory,
            (S::Memory, C::State, _) => S::StateReceived,
            (S::StateReceived, C::Digests, _) => S::Verified,
            (S::Verified, C::Complete, M::Auto) => S::Running,
            (S::Verified, C::Switchover, M::Coordinated) => S::GoAhead,
            (S::GoAhead, C::Complete, M::Coordinated) => S::Running,
            (S::Data, C::Memory | C::Sparse | C::Sync, _) => S::Data,
            (
                S::AwaitConfig | S::Memory | S::Data | S::StateReceived | S::Verified | S::GoAhead,
                C::Abandon,
                _,
            ) => S::Closed,
            (state, cmd, _) => return Err(OutOfOrder { state, cmd }),
        })
    }
}

/// Largest payload a frame may declare before the peer proved the token or a ticket
/// (the Hello it owes is 83 bytes): an unauthenticated peer cannot make the receiver
/// allocate more than this per connection.
pub const HANDSHAKE_MAX_FRAME: u64 = 128;

/// Why a frame was refused from its header alone (nothing of it was read further).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameRefused {
    #[error(transparent)]
    OutOfOrder(#[from] OutOfOrder),
    #[error("{cmd:?} declares {len} payload bytes; at most {max} are allowed in state {state:?}")]
    TooLong {
        state: ReceiverState,
        cmd: Command,
        len: u64,
        max: u64,
    },
}

impl ReceiverState {
    /// Whether the peer has proved the cluster token or a ticket by this state.
    pub fn authenticated(self) -> bool {
        !matches!(self, ReceiverState::AwaitHello)
    }

    /// The largest payload a `cmd` frame may declare in this state (pure). A command
    /// the state does not accept is refused outright, and before authentication only
    /// small frames pass, so the shell checks a header against this before it
    /// allocates anything for the payload.
    pub fn max_frame_len(self, cmd: Command, mode: SwitchoverMode) -> Result<u64, OutOfOrder> {
        self.next(cmd, mode)?;
        let max = cmd.max_payload();
        Ok(if self.authenticated() {
            max
        } else {
            max.min(HANDSHAKE_MAX_FRAME)
        })
    }

    /// Checks a received header against [`Self::max_frame_len`].
    pub fn check_header(
        self,
        h: &protocol::FrameHeader,
        mode: SwitchoverMode,
    ) -> Result<(), FrameRefused> {
        let max = self.max_frame_len(h.cmd, mode)?;
        if h.length > max {
            return Err(FrameRefused::TooLong {
                state: self,
                cmd: h.cmd,
                len: h.length,
                max,
            });
        }
        Ok(())
    }
}

/// Largest guest a target accepts (a sanity bound before any allocation).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Checks a Config before the VM manager sees it. Pure.
pub fn check_config(chunk_size: u64, streams: u16, spec: &VmSpec) -> Result<(), String> {
    if !chunk_size.is_power_of_two() || !(64 << 10..=1 << 30).contains(&chunk_size) {
        return Err(format!(
            "chunk size {chunk_size} is not a power of two between 64 KiB and 1 GiB"
        ));
    }
    if !(1..=64).contains(&streams) {
        return Err(format!("{streams} streams; between 1 and 64 are allowed"));
    }
    if spec.memory_mib == 0 || spec.memory_mib > MAX_MEMORY_MIB {
        return Err(format!(
            "memory size {} MiB is out of range",
            spec.memory_mib
        ));
    }
    if spec.vcpus == 0 {
        return Err("the VM has no vCPU".into());
    }
    if spec.name.is_empty() || spec.name.len() > 128 {
        return Err("the VM name is empty or too long".into());
    }
    Ok(())
}
