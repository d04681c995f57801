//! The husk.v1 gRPC service: maps each call onto the daemon and its errors onto status codes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::agent::{self, guest_message, host_message, GuestMessage, HostMessage};
use husk_proto::v1::husk_server::Husk;
use husk_proto::v1::{
    exec_request, exec_response, ConsoleChunk, CreateVmRequest, DeleteVmRequest, DeleteVmResponse,
    Event, ExecExit, ExecRequest, ExecResponse, GetVmRequest, ListVmsRequest, ListVmsResponse,
    PauseVmRequest, RestoreVmRequest, ResumeVmRequest, SnapshotVmRequest, SnapshotVmResponse,
    StartVmRequest, StopVmRequest, StreamConsoleRequest, UpdateRateLimitsRequest, Vm,
    WatchEventsRequest,
};
use husk_proto::v1::{
    AddContainerRequest, AttachDiskRequest, ContainerStats, DetachDiskRequest,
    GetContainerStatsRequest, GetHostUsageRequest, GetVmMemoryRequest, HostUsage,
    RemoveContainerRequest, SetMemoryTargetRequest, VmMemory,
};
use husk_proto::v1::{
    CreateTemplateRequest, DeleteTemplateRequest, DeleteTemplateResponse, GetTemplateRequest,
    ListTemplatesRequest, ListTemplatesResponse, Template,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::agent_client;
use crate::daemon::Daemon;
use crate::wire;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How long Exec waits for the guest agent of a VM that has just started.
const EXEC_AGENT_WAIT: Duration = Duration::from_secs(60);
/// Console bytes per message.
const CONSOLE_CHUNK: usize = 32 * 1024;

#[derive(Clone)]
pub struct HuskService {
    daemon: Arc<Daemon>,
}

impl HuskService {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self { daemon }
    }
}

#[tonic::async_trait]
impl Husk for HuskService {
    async fn create_vm(&self, request: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        if !request.template.is_empty() {
            return Ok(Response::new(
                self.daemon.clone_template(&request.template, &spec).await?,
            ));
        }
        if request.match_template && request.start {
            if let Some(name) = self.daemon.matching_template(&spec) {
                // What a clone may differ in; the rest matched the template's.
                let clone = husk_proto::v1::VmSpec {
                    name: spec.name.clone(),
                    labels: spec.labels.clone(),
                    hostname: spec.hostname.clone(),
                    ..Default::default()
                };
                return Ok(Response::new(
                    self.daemon.clone_template(&name, &clone).await?,
                ));
            }
        }
        let entry = self.daemon.create(spec)?;
        if request.start {
            return Ok(Response::new(self.daemon.start(&entry).await?));
        }
        Ok(Response::new(self.daemon.get(&entry.id)?))
    }

    async fn create_template(
        &self,
        request: Request<CreateTemplateRequest>,
    ) -> Result<Response<Template>, Status> {
        Ok(Response::new(
            self.daemon.create_template(request.into_inner()).await?,
        ))
    }

    async fn list_templates(
        &self,
        _request: Request<ListTemplatesRequest>,
    ) -> Result<Response<ListTemplatesResponse>, Status> {
        Ok(Response::new(ListTemplatesResponse {
            templates: self.daemon.list_templates(),
        }))
    }

    async fn get_template(
        &self,
        request: Request<GetTemplateRequest>,
    ) -> Result<Response<Template>, Status> {
        Ok(Response::new(
            self.daemon.get_template(&request.into_inner().name)?,
        ))
    }

    async fn delete_template(
        &self,
        request: Request<DeleteTemplateRequest>,
    ) -> Result<Response<DeleteTemplateResponse>, Status> {
        self.daemon.delete_template(&request.into_inner().name)?;
        Ok(Response::new(DeleteTemplateResponse {}))
    }

    async fn start_vm(&self, request: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        let entry = self.daemon.resolve(&request.into_inner().vm)?;
        Ok(Response::new(self.daemon.start(&entry).await?))
    }

    async fn stop_vm(&self, request: Request<StopVmRequest>) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        let timeout = Duration::from_millis(u64::from(request.timeout_ms));
        Ok(Response::new(
            self.daemon.stop(&entry, timeout, request.force).await?,
        ))
    }

    async fn delete_vm(
        &self,
        request: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        self.daemon.delete(&entry, request.force).await?;
        Ok(Response::new(DeleteVmResponse {}))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        Ok(Response::new(self.daemon.get(&request.into_inner().vm)?))
    }

    async fn list_vms(
        &self,
        request: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let vms = self.daemon.list(&request.into_inner().label_selector);
        Ok(Response::new(ListVmsResponse { vms }))
    }

    async fn pause_vm(&self, request: Request<PauseVmRequest>) -> Result<Response<Vm>, Status> {
        let entry = self.daemon.resolve(&request.into_inner().vm)?;
        Ok(Response::new(self.daemon.set_paused(&entry, true).await?))
    }

    async fn resume_vm(&self, request: Request<ResumeVmRequest>) -> Result<Response<Vm>, Status> {
        let entry = self.daemon.resolve(&request.into_inner().vm)?;
        Ok(Response::new(self.daemon.set_paused(&entry, false).await?))
    }

    async fn update_rate_limits(
        &self,
        request: Request<UpdateRateLimitsRequest>,
    ) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.update_rate_limits(&entry, &request).await?,
        ))
    }

    async fn attach_disk(
        &self,
        request: Request<AttachDiskRequest>,
    ) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.attach_disk(&entry, &request).await?,
        ))
    }

    async fn detach_disk(
        &self,
        request: Request<DetachDiskRequest>,
    ) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.detach_disk(&entry, &request).await?,
        ))
    }

    async fn add_container(
        &self,
        request: Request<AddContainerRequest>,
    ) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.add_container(&entry, &request).await?,
        ))
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.remove_container(&entry, &request).await?,
        ))
    }

    async fn get_container_stats(
        &self,
        request: Request<GetContainerStatsRequest>,
    ) -> Result<Response<ContainerStats>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.container_stats(&entry, &request).await?,
        ))
    }

    async fn set_memory_target(
        &self,
        request: Request<SetMemoryTargetRequest>,
    ) -> Result<Response<VmMemory>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.set_memory_target(&entry, &request).await?,
        ))
    }

    async fn get_vm_memory(
        &self,
        request: Request<GetVmMemoryRequest>,
    ) -> Result<Response<VmMemory>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.vm_memory(&entry, &request).await?,
        ))
    }

    async fn get_host_usage(
        &self,
        _request: Request<GetHostUsageRequest>,
    ) -> Result<Response<HostUsage>, Status> {
        Ok(Response::new(self.daemon.host_usage().await))
    }

    async fn snapshot_vm(
        &self,
        request: Request<SnapshotVmRequest>,
    ) -> Result<Response<SnapshotVmResponse>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        Ok(Response::new(
            self.daemon.snapshot_vm(&entry, &request).await?,
        ))
    }

    async fn restore_vm(&self, request: Request<RestoreVmRequest>) -> Result<Response<Vm>, Status> {
        Ok(Response::new(
            self.daemon.restore_vm(request.into_inner()).await?,
        ))
    }

    type WatchEventsStream = ResponseStream<Event>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let wanted = request.into_inner().vm;
        // Resolve once: a name keeps meaning the same VM for the stream's life.
        let id = if wanted.is_empty() {
            None
        } else {
            Some(self.daemon.resolve(&wanted)?.id.clone())
        };
        let mut events = self.daemon.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "this watcher fell {n} events behind; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                if id.as_ref().is_some_and(|id| *id != event.vm_id) {
                    continue;
                }
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type StreamConsoleStream = ResponseStream<ConsoleChunk>;

    async fn stream_console(
        &self,
        request: Request<StreamConsoleRequest>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        let request = request.into_inner();
        let entry = self.daemon.resolve(&request.vm)?;
        let path = entry.dir.join(crate::store::CONSOLE_LOG);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Response::new(Box::pin(tokio_stream::empty())));
            }
            Err(e) => return Err(Status::internal(format!("console log: {e}"))),
        };
        let daemon = self.daemon.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut buf = vec![0u8; CONSOLE_CHUNK];
            loop {
                // Whether the VM was live before this read: if not, this read drains the rest.
                let live = request.follow && daemon.is_live(&entry);
                match file.read(&mut buf).await {
                    Ok(0) if live => {
                        // The VMM caps the console file by starting it over: follow it there.
                        if let (Ok(at), Ok(meta)) =
                            (file.stream_position().await, file.metadata().await)
                        {
                            if meta.len() < at {
                                let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = ConsoleChunk {
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("console log: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = ResponseStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut input = request.into_inner();
        let start = match input.next().await {
            Some(Ok(ExecRequest {
                msg: Some(exec_request::Msg::Start(start)),
            })) => start,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "Exec: the first message must be `start`",
                ))
            }
        };
        if start.command.first().is_none_or(|c| c.is_empty()) {
            return Err(Status::invalid_argument("command: empty"));
        }
        let entry = self.daemon.resolve(&start.vm)?;
        let socket = self
            .daemon
            .agent_socket(&entry, "Exec", EXEC_AGENT_WAIT)
            .await?;
        let mut stream = agent_client::connect(&socket, Duration::from_secs(5))
            .await
            .map_err(|e| Status::unavailable(format!("Exec: cannot reach the guest agent: {e}")))?;
        let mut env: Vec<String> = start.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.sort();
        let window = start.window.map(|w| agent::WindowSize {
            rows: w.rows,
            cols: w.cols,
        });
        let exec = HostMessage {
            msg: Some(host_message::Msg::Exec(agent::Exec {
                argv: start.command.clone(),
                env,
                workdir: start.workdir.clone(),
                tty: start.tty,
                window,
                user: start.user.as_ref().map(|u| agent::User {
                    uid: u.uid,
                    gid: u.gid,
                    additional_gids: u.additional_gids.clone(),
                }),
                container: start.container.clone(),
            })),
        };
        let first: GuestMessage = wire::exchange(&mut stream, &exec, Duration::from_secs(30))
            .await
            .map_err(|e| Status::unavailable(format!("Exec: guest agent: {e}")))?;
        let pid = match first.msg {
            Some(guest_message::Msg::StartedPid(pid)) => pid,
            Some(guest_message::Msg::Error(e)) => {
                return Err(Status::invalid_argument(format!("Exec: {e}")));
            }
            other => {
                return Err(Status::internal(format!(
                    "Exec: unexpected first reply from the guest agent: {other:?}"
                )));
            }
        };
        let (mut from_agent, mut to_agent) = stream.into_split();
        let (tx, rx) = mpsc::channel(64);
        let _ = tx
            .send(Ok(ExecResponse {
                msg: Some(exec_response::Msg::StartedPid(pid)),
            }))
            .await;
        // Client -> agent: stdin, end of stdin, resizes, signals.
        let pump_in = tokio::spawn(async move {
            while let Some(Ok(request)) = input.next().await {
                let msg = match request.msg {
                    Some(exec_request::Msg::Stdin(data)) => host_message::Msg::Stdin(data),
                    Some(exec_request::Msg::CloseStdin(_)) => host_message::Msg::CloseStdin(true),
                    Some(exec_request::Msg::Resize(w)) => {
                        host_message::Msg::Resize(agent::WindowSize {
                            rows: w.rows,
                            cols: w.cols,
                        })
                    }
                    Some(exec_request::Msg::Signal(sig)) => host_message::Msg::Signal(sig),
                    Some(exec_request::Msg::Start(_)) | None => continue,
                };
                let frame = HostMessage { msg: Some(msg) };
                if wire::write_frame(&mut to_agent, &frame).await.is_err() {
                    return;
                }
            }
            // The client's stream ended: keep the write half open (closing it would end the
            // process's stdin only if the client asked for that).
            std::future::pending::<()>().await;
        });
        // Agent -> client: output, then the exit.
        tokio::spawn(async move {
            loop {
                let message: GuestMessage = match wire::read_frame(&mut from_agent).await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "Exec: the guest agent closed the connection (VM stopped?)",
                            )))
                            .await;
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("Exec: {e}")))).await;
                        break;
                    }
                };
                let reply = match message.msg {
                    Some(guest_message::Msg::Stdout(d)) => exec_response::Msg::Stdout(d),
                    Some(guest_message::Msg::Stderr(d)) => exec_response::Msg::Stderr(d),
                    Some(guest_message::Msg::Exit(exit)) => {
                        let done = exec_response::Msg::Exit(ExecExit {
                            code: exit.code,
                            signal: exit.signal,
                        });
                        let _ = tx.send(Ok(ExecResponse { msg: Some(done) })).await;
                        break;
                    }
                    Some(guest_message::Msg::Error(e)) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("Exec: guest agent: {e}"))))
                            .await;
                        break;
                    }
                    _ => continue,
                };
                if tx
                    .send(Ok(ExecResponse { msg: Some(reply) }))
                    .await
                    .is_err()
                {
                    // The client went away: dropping the connection makes the agent kill the
                    // process.
                    break;
                }
            }
            pump_in.abort();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
