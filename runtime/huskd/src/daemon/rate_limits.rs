//! UpdateRateLimits: new limits for a running VM's devices, forwarded to its VMM's control
//! socket (`set_rate_limits`) and kept in its spec, so that a later start has them too.

use std::sync::Arc;

use husk_proto::v1::{UpdateRateLimitsRequest, Vm, VmState};
use husk_proto::vmm::{vmm_request, ErrorKind};
use tonic::Status;

use super::{vmm_call, Daemon, VmEntry, VmmCallError};
use crate::rate_limits::{apply_to_spec, apply_to_status, to_vmm_request};
use crate::validate;

impl Daemon {
    /// Replaces the limits named in `request` (see UpdateRateLimits in husk.proto).
    pub async fn update_rate_limits(
        &self,
        entry: &Arc<VmEntry>,
        request: &UpdateRateLimitsRequest,
    ) -> Result<Vm, Status> {
        validate::rate_limit_values(request)?;
        let _op = entry.op.lock().await;
        if !matches!(entry.state(), VmState::Running | VmState::Paused) {
            return Err(entry.wrong_state("UpdateRateLimits"));
        }
        let spec = entry.snapshot().spec.unwrap_or_default();
        validate::rate_limit_targets(request, &spec)?;
        let msg = vmm_request::Msg::SetRateLimits(to_vmm_request(request));
        vmm_call(&entry.api_socket(), msg)
            .await
            .map_err(|e| match &e {
                VmmCallError::Refused {
                    kind: ErrorKind::NoSuchDevice | ErrorKind::InvalidLimit,
                    ..
                } => Status::invalid_argument(format!("UpdateRateLimits: husk-vmm: {e}")),
                _ => Status::internal(format!("UpdateRateLimits: husk-vmm: {e}")),
            })?;
        tracing::info!(vm_id = %entry.id, "rate limits updated");
        Ok(entry.update(|vm| {
            if let Some(spec) = vm.spec.as_mut() {
                apply_to_spec(spec, request);
            }
            apply_to_status(VmEntry::status_mut(vm), request);
        }))
    }
}
