//! Publishing task events to containerd.
//!
//! containerd 1.6 gives every shim `TTRPC_ADDRESS` (its ttrpc socket); events go there as
//! `containerd.services.events.ttrpc.v1.Events/Forward`, the way containerd's own shims send
//! them. Without that variable (or when the ttrpc call fails) the fallback is the documented
//! one: `<publish-binary> --address <address> publish --topic T --namespace NS` with the event
//! as a protobuf `Any` on stdin. Events are queued and sent in order by one task, so a slow
//! containerd never stalls an RPC.

use std::time::SystemTime;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField, MessageFull};
use containerd_shim_protos::shim::events::{Envelope, ForwardRequest};
use containerd_shim_protos::shim_async::EventsClient;
use containerd_shim_protos::topics;
use tokio::sync::mpsc;

/// One event: its topic and the encoded `Any`.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: &'static str,
    pub any: Any,
}

/// Packs an event as containerd's typeurl does for its events: the message's full name.
pub fn pack<M: MessageFull>(topic: &'static str, m: &M) -> Option<Event> {
    let value = m.write_to_bytes().ok()?;
    let mut any = Any::new();
    any.type_url = M::descriptor().full_name().to_string();
    any.value = value;
    Some(Event { topic, any })
}

pub fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    MessageField::some(ts)
}

/// The topics of the events this shim publishes, by type.
pub trait Topic: MessageFull {
    const TOPIC: &'static str;
}
impl Topic for TaskCreate {
    const TOPIC: &'static str = topics::TASK_CREATE_EVENT_TOPIC;
}
impl Topic for TaskStart {
    const TOPIC: &'static str = topics::TASK_START_EVENT_TOPIC;
}
impl Topic for TaskExit {
    const TOPIC: &'static str = topics::TASK_EXIT_EVENT_TOPIC;
}
impl Topic for TaskDelete {
    const TOPIC: &'static str = topics::TASK_DELETE_EVENT_TOPIC;
}
impl Topic for TaskExecAdded {
    const TOPIC: &'static str = topics::TASK_EXEC_ADDED_EVENT_TOPIC;
}
impl Topic for TaskExecStarted {
    const TOPIC: &'static str = topics::TASK_EXEC_STARTED_EVENT_TOPIC;
}
impl Topic for TaskPaused {
    const TOPIC: &'static str = "/tasks/paused";
}
impl Topic for TaskResumed {
    const TOPIC: &'static str = "/tasks/resumed";
}

/// Queues events for the sender task.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Event>,
}

impl Publisher {
    /// Starts the sender task (on the current tokio runtime).
    pub fn start(namespace: String, address: String, publish_binary: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let ttrpc_address = std::env::var("TTRPC_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty());
        tokio::spawn(async move {
            let mut client: Option<EventsClient> = None;
            while let Some(event) = rx.recv().await {
                if let Some(addr) = &ttrpc_address {
                    if client.is_none() {
                        let url = if addr.starts_with("unix://") {
                            addr.clone()
                        } else {
                            format!("unix://{addr}")
                        };
                        match containerd_shim_protos::ttrpc::asynchronous::Client::connect(&url) {
                            Ok(c) => client = Some(EventsClient::new(c)),
                            Err(e) => tracing::warn!("events: cannot connect to {url}: {e}"),
                        }
                    }
                    if let Some(c) = &client {
                        let mut envelope = Envelope::new();
                        envelope.timestamp = timestamp(SystemTime::now());
                        envelope.namespace = namespace.clone();
                        envelope.topic = event.topic.to_string();
                        envelope.event = MessageField::some(event.any.clone());
                        let mut req = ForwardRequest::new();
                        req.envelope = MessageField::some(envelope);
                        let ctx =
                            containerd_shim_protos::ttrpc::context::with_timeout(5_000_000_000);
                        match c.forward(ctx, &req).await {
                            Ok(_) => continue,
                            Err(e) => {
                                tracing::warn!("events: forward {} failed: {e}", event.topic);
                                client = None;
                            }
                        }
                    }
                }
                publish_with_binary(&publish_binary, &address, &namespace, &event).await;
            }
        });
        Self { tx }
    }

    pub fn publish<M: Topic>(&self, m: &M) {
        if let Some(e) = pack(M::TOPIC, m) {
            let _ = self.tx.send(e);
        }
    }
}

async fn publish_with_binary(binary: &str, address: &str, namespace: &str, event: &Event) {
    if binary.is_empty() || address.is_empty() {
        return;
    }
    let Ok(bytes) = event.any.write_to_bytes() else {
        return;
    };
    let child = tokio::process::Command::new(binary)
        .args(["--address", address, "publish", "--topic", event.topic])
        .args(["--namespace", namespace])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        tracing::warn!("events: cannot run {binary}");
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&bytes).await;
    }
    match child.wait_with_output().await {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::warn!(
            "events: {binary} publish {}: {}",
            event.topic,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => tracing::warn!("events: {binary} publish: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_packed_under_containerds_type_names_and_topics() {
        let mut exit = TaskExit::new();
        exit.container_id = "c1".into();
        exit.exit_status = 3;
        exit.exited_at = timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5));
        let e = pack(TaskExit::TOPIC, &exit).unwrap();
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.any.type_url, "containerd.events.TaskExit");
        let back = TaskExit::parse_from_bytes(&e.any.value).unwrap();
        assert_eq!(back.container_id, "c1");
        assert_eq!(back.exit_status, 3);
        assert_eq!(back.exited_at.seconds, 5);
        assert_eq!(
            pack(TaskExecStarted::TOPIC, &TaskExecStarted::new())
                .unwrap()
                .any
                .type_url,
            "containerd.events.TaskExecStarted"
        );
    }
}
