//! Where worker sockets live: a private directory, one socket per worker guarded by a lock
//! file, stale sockets removed, live ones refused.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use experts::ExpertSet;
use nix::fcntl::{Flock, FlockArg};

use crate::client::ConnectOptions;
use crate::error::{ProtoError, Result};
use crate::server::WorkerServer;
use crate::types::ModelIdentity;

/// A directory only the current user can enter (mode 0700, owned by the effective uid).
#[derive(Debug, Clone)]
pub struct SocketDir {
    path: PathBuf,
}

impl SocketDir {
    /// Creates `dir` (and missing parents) with mode 0700, or accepts an existing one, then
    /// verifies it: a real directory (not a symlink), owned by us, mode exactly 0700.
    pub fn create_private(dir: &Path) -> Result<Self> {
        match DirBuilder::new().recursive(true).mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ProtoError::io("create socket directory", e)),
        }
        let md = std::fs::symlink_metadata(dir).map_err(|e| ProtoError::io("stat socket directory", e))?;
        if !md.file_type().is_dir() {
            return Err(ProtoError::NotADirectory { path: dir.to_owned() });
        }
        let uid = nix::unistd::geteuid().as_raw();
        if md.uid() != uid {
            return Err(ProtoError::DirOwner { path: dir.to_owned(), expected: uid, found: md.uid() });
        }
        let mode = md.mode() & 0o7777;
        if mode != 0o700 {
            return Err(ProtoError::DirMode { path: dir.to_owned(), found: mode });
        }
        Ok(SocketDir { path: dir.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DIR/NAME.sock`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.sock"))
    }

    /// Binds `DIR/NAME.sock` (see [`Listener::bind`]).
    pub fn listen(&self, name: &str) -> Result<Listener> {
        Listener::bind(&self.socket_path(name))
    }
}

/// A listening worker socket, exclusively ours while this value lives: an exclusive `flock`
/// on `PATH.lock` is held, and the socket file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    _lock: Flock<File>,
}

impl Listener {
    /// Takes the lock `PATH.lock` (held by another process: "socket PATH is in use"), then
    /// looks at `PATH`: a socket nobody accepts on (connect fails with ECONNREFUSED) is stale
    /// and removed; one that accepts is in use (refused); then binds.
    pub fn bind(path: &Path) -> Result<Self> {
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_name)
            .map_err(|e| ProtoError::io("open socket lock file", e))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(ProtoError::SocketInUse { path: path.to_owned() }),
            Err((_, e)) => return Err(ProtoError::io("lock socket lock file", e)),
        };
        match std::fs::symlink_metadata(path) {
            Ok(md) => {
                if !md.file_type().is_socket() {
                    return Err(ProtoError::NotASocket { path: path.to_owned() });
                }
                match UnixStream::connect(path) {
                    Ok(_) => return Err(ProtoError::SocketInUse { path: path.to_owned() }),
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        tracing::info!(path = %path.display(), "removing stale socket");
                        std::fs::remove_file(path).map_err(|e| ProtoError::io("remove stale socket", e))?;
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(ProtoError::io("probe existing socket", e)),
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(ProtoError::io("stat socket path", e)),
        }
        let inner = UnixListener::bind(path).map_err(|e| ProtoError::io("bind worker socket", e))?;
        Ok(Listener { inner, path: path.to_owned(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one daemon connection and runs the worker side of the handshake (for a
    /// worker whose experts are already loaded).
    pub fn accept(&self, identity: &ModelIdentity, experts: ExpertSet, opts: &ConnectOptions) -> Result<WorkerServer> {
        WorkerServer::handshake(self.accept_stream()?, identity, experts, opts)
    }

    /// Accepts one daemon connection, to be handshaken by the caller
    /// ([`WorkerServer::start_handshake`] for a worker that loads after connecting).
    pub fn accept_stream(&self) -> Result<UnixStream> {
        let (sock, _) = self.inner.accept().map_err(|e| ProtoError::io("accept", e))?;
        Ok(sock)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Still under the lock: nobody else can have bound this path.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "could not remove the socket file");
        }
    }
}
