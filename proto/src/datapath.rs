//! The gRPC data-path API, `ferry.datapath.v1` (`proto/ferry/datapath/v1/datapath.proto`, generated at build
//! time): what Ferry's pod agent asks of a data path — its own engine or a third party's — over a unix
//! socket shared by the two containers of a mover pod. design/0004-datapath-api.md is the contract in prose.

/// The generated code, nested as the protobuf packages are (`ferry.agent.v1` refers to `ferry.datapath.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod pb {
    pub mod ferry {
        pub mod datapath {
            pub mod v1 {
                tonic::include_proto!("ferry.datapath.v1");
            }
        }
        pub mod agent {
            pub mod v1 {
                tonic::include_proto!("ferry.agent.v1");
            }
        }
    }
}

pub use pb::ferry::datapath::v1::*;

/// The controller's one typed request to its pod agent, `ferry.agent.v1.AgentJob`
/// (`proto/ferry/agent/v1/agent.proto`): the CR, the report interval and the data-path call.
pub mod agent {
    pub use super::pb::ferry::agent::v1::*;

    /// The agent's environment variable holding the base64 protobuf [`AgentJob`].
    pub const ENV_JOB: &str = "FERRY_AGENT_JOB";
}

/// The API version this crate speaks, as `GetInfoResponse.api_version` states it.
pub const API_VERSION: &str = "v1";
/// Environment variable naming the socket, in both containers.
pub const ENV_SOCKET: &str = "FERRY_DATAPATH_SOCKET";
/// Directory of the socket: an emptyDir both containers of a mover pod mount (the agent's and the data
/// path's), read-write for both.
pub const SOCKET_DIR: &str = "/ferry/run";
/// The socket's default path.
pub const SOCKET_PATH: &str = "/ferry/run/datapath.sock";
/// Where the agent writes the endpoint's extra CA certificates (PEM) before the call, when the
/// BackupStorageLocation names some (`Repository.ca_file` then points here).
pub const CA_FILE: &str = "/ferry/run/ca.pem";

/// One message of a call's stream, whatever the call: progress, or the one result.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece<R> {
    /// Progress so far.
    Progress(Progress),
    /// The call's result.
    Result(R),
}

/// The stream messages of `Backup`, `Restore` and `Forget`, read alike.
pub trait StreamEvent {
    /// The call's result message.
    type Result;
    /// The message as a [`Piece`]; `None` for an empty message (a protocol breach).
    fn piece(self) -> Option<Piece<Self::Result>>;
}

macro_rules! stream_event {
    ($event:ty, $module:ident, $result:ty) => {
        impl StreamEvent for $event {
            type Result = $result;
            fn piece(self) -> Option<Piece<$result>> {
                Some(match self.event? {
                    $module::Event::Progress(p) => Piece::Progress(p),
                    $module::Event::Result(r) => Piece::Result(r),
                })
            }
        }
    };
}
stream_event!(BackupEvent, backup_event, BackupResult);
stream_event!(RestoreEvent, restore_event, RestoreResult);
stream_event!(ForgetEvent, forget_event, ForgetResult);

impl GetInfoResponse {
    /// Whether the data path advertises `c`.
    pub fn can(&self, c: Capability) -> bool {
        self.capabilities.contains(&(c as i32))
    }
}

/// A client of the data path serving on the unix socket `socket`. Connects lazily: the first call fails
/// with `UNAVAILABLE` while nothing listens, which callers retry (the data path container may start later).
pub fn connect(
    socket: impl Into<std::path::PathBuf>,
) -> data_path_client::DataPathClient<tonic::transport::Channel> {
    let socket = socket.into();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://datapath.invalid")
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }));
    data_path_client::DataPathClient::new(channel)
}
