//! Private socket directory, stale socket removal, live socket refused.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use ipc_proto::{Listener, ProtoError, SocketDir};

#[test]
fn creates_a_private_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = tmp.path().join("a/b/dflash");
    let d = SocketDir::create_private(&p).expect("create");
    let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    assert_eq!(d.socket_path("w0"), p.join("w0.sock"));
    // An existing private directory is accepted.
    SocketDir::create_private(&p).expect("again");
}

#[test]
fn refuses_a_directory_others_can_enter() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = tmp.path().join("open");
    std::fs::DirBuilder::new().mode(0o755).create(&p).expect("mkdir");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let e = SocketDir::create_private(&p).expect_err("not private");
    assert!(matches!(e, ProtoError::DirMode { found: 0o755, .. }), "{e}");
    assert!(e.to_string().contains("expected mode 0700, found 0755"), "{e}");
}

#[test]
fn refuses_a_symlink_or_a_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("real");
    SocketDir::create_private(&target).expect("create");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    assert!(matches!(SocketDir::create_private(&link), Err(ProtoError::NotADirectory { .. })));
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    assert!(SocketDir::create_private(&file).is_err());
}

#[test]
fn stale_socket_is_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = SocketDir::create_private(&tmp.path().join("s")).expect("dir");
    let path = dir.socket_path("w");
    // A socket file left behind by a dead process: bound, then closed (the file stays).
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    assert_eq!(UnixStream::connect(&path).expect_err("stale").kind(), std::io::ErrorKind::ConnectionRefused);
    let l = dir.listen("w").expect("stale socket replaced");
    UnixStream::connect(&path).expect("the new socket accepts");
    drop(l);
    assert!(!path.exists());
}

#[test]
fn live_socket_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = SocketDir::create_private(&tmp.path().join("s")).expect("dir");
    let path = dir.socket_path("w");
    // Another listener holding the lock.
    let first = dir.listen("w").expect("first");
    let e = Listener::bind(&path).expect_err("in use");
    assert!(matches!(e, ProtoError::SocketInUse { .. }), "{e}");
    assert_eq!(e.to_string(), format!("socket {} is in use by another process", path.display()));
    drop(first);
    // A listener that does not take the lock (someone else's program) is detected by connect.
    let other = UnixListener::bind(&path).expect("plain bind");
    let e = Listener::bind(&path).expect_err("in use");
    assert!(matches!(e, ProtoError::SocketInUse { .. }), "{e}");
    drop(other);
    // The path is not a socket at all.
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(&path, b"x").expect("write");
    assert!(matches!(Listener::bind(&path), Err(ProtoError::NotASocket { .. })));
}
