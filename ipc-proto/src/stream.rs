//! A framed, non-blocking Unix stream: buffered reads with deadlines (optionally spinning
//! before blocking), whole-frame writes without SIGPIPE, file descriptors over SCM_RIGHTS.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::time::TimeSpec;

use crate::error::{ProtoError, Result};
use crate::frame::{decode_error, Header, HEADER_LEN};
use crate::types::{FrameType, Limits};

const INITIAL_BUF: usize = 64 * 1024;

pub(crate) struct Conn {
    sock: UnixStream,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    cmsg: Vec<u8>,
    fds: Vec<OwnedFd>,
    pub(crate) wbuf: Vec<u8>,
    spin: Duration,
    closed: bool,
}

impl Conn {
    pub(crate) fn new(sock: UnixStream, spin: Duration) -> Result<Self> {
        sock.set_nonblocking(true).map_err(|e| ProtoError::io("set socket non-blocking", e))?;
        Ok(Conn {
            sock,
            rbuf: vec![0; INITIAL_BUF],
            rstart: 0,
            rend: 0,
            cmsg: nix::cmsg_space!([RawFd; 4]),
            fds: Vec::new(),
            wbuf: Vec::with_capacity(1024),
            spin,
            closed: false,
        })
    }

    pub(crate) fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(ProtoError::Closed);
        }
        Ok(())
    }

    /// Closes both directions; every later call fails with `Closed`.
    pub(crate) fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(crate) fn take_fd(&mut self) -> Option<OwnedFd> {
        if self.fds.is_empty() {
            None
        } else {
            Some(self.fds.remove(0))
        }
    }

    /// One non-blocking receive into the buffer. Ok(0) is EOF, Err(EAGAIN) nothing yet.
    fn recv_once(&mut self) -> std::result::Result<usize, Errno> {
        let fd = self.sock.as_raw_fd();
        let mut iov = [IoSliceMut::new(&mut self.rbuf[self.rend..])];
        let msg = recvmsg::<UnixAddr>(
            fd,
            &mut iov,
            Some(&mut self.cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut got = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    got.extend(fds);
                }
            }
        }
        for raw in got {
            // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we are its only owner.
            self.fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        if truncated {
            // More descriptors than we accept: the kernel closed the rest. Treat as a bad frame.
            return Err(Errno::EMSGSIZE);
        }
        self.rend += n;
        Ok(n)
    }

    /// Waits until the socket is readable (or writable) or the deadline passes.
    fn wait(&self, flags: PollFlags, deadline: Option<Instant>, started: Instant, during: &'static str) -> Result<()> {
        loop {
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(ProtoError::Timeout { waited: now - started, during });
                    }
                    Some(TimeSpec::from_duration(d - now))
                }
            };
            let mut pfd = [PollFd::new(std::os::fd::AsFd::as_fd(&self.sock), flags)];
            match nix::poll::ppoll(&mut pfd, timeout, None) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ProtoError::io("poll socket", e)),
            }
        }
    }

    /// Makes `need` bytes available from `rstart`.
    fn fill(&mut self, need: usize, deadline: Option<Instant>, during: &'static str) -> Result<()> {
        if self.rend - self.rstart >= need {
            return Ok(());
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        if self.rstart + need > self.rbuf.len() {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
            if need > self.rbuf.len() {
                self.rbuf.resize(need, 0);
            }
        }
        let started = Instant::now();
        let spin_until = (!self.spin.is_zero()).then(|| started + self.spin);
        while self.rend - self.rstart < need {
            match self.recv_once() {
                Ok(0) => {
                    let have = self.rend - self.rstart;
                    return Err(if have == 0 {
                        ProtoError::PeerClosed { during }
                    } else {
                        ProtoError::Truncated { expected: need, found: have }
                    });
                }
                Ok(_) => {}
                Err(Errno::EAGAIN) => {
                    if spin_until.is_some_and(|s| Instant::now() < s) {
                        std::hint::spin_loop();
                        continue;
                    }
                    self.wait(PollFlags::POLLIN, deadline, started, during)?;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EMSGSIZE) => {
                    return Err(ProtoError::UnexpectedFd { frame: FrameType::Setup, found: self.fds.len() + 4 })
                }
                Err(e) => return Err(ProtoError::io("recvmsg", e)),
            }
        }
        Ok(())
    }

    /// Reads one frame. `accept` says which types the state allows (`expected` names them);
    /// an `Error` frame is always accepted and returned as `ProtoError::Remote`. Lengths are
    /// checked against `limits` before the payload is read. Any error closes the connection.
    pub(crate) fn read_frame(
        &mut self,
        deadline: Option<Instant>,
        during: &'static str,
        limits: Option<&Limits>,
        accept: &dyn Fn(FrameType) -> bool,
        expected: &'static str,
    ) -> Result<(Header, &[u8])> {
        self.check_open()?;
        match self.read_frame_inner(deadline, during, limits, accept, expected) {
            Ok((h, start)) => Ok((h, &self.rbuf[start..start + h.payload_len as usize])),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Ends the connection after `e`: tells the peer why with an `Error` frame when `e` is a
    /// protocol violation (not when the peer is gone or sent the error itself), then closes.
    pub(crate) fn fail(&mut self, e: ProtoError) -> ProtoError {
        if !self.closed && !e.is_peer_lost() && !matches!(e, ProtoError::Remote { .. } | ProtoError::Closed) {
            let msg = e.to_string();
            let code = e.code();
            let out = self.begin_frame();
            crate::frame::encode_error(out, code, &msg);
            let deadline = Instant::now() + Duration::from_millis(100);
            if let Err(se) = self.send_inner(FrameType::Error, 0, &[], None, Some(deadline)) {
                tracing::debug!(error = %se, "could not send the error frame");
            }
        }
        tracing::debug!(error = %e, "closing the connection");
        self.close();
        e
    }

    fn read_frame_inner(
        &mut self,
        deadline: Option<Instant>,
        during: &'static str,
        limits: Option<&Limits>,
        accept: &dyn Fn(FrameType) -> bool,
        expected: &'static str,
    ) -> Result<(Header, usize)> {
        self.fill(HEADER_LEN, deadline, during)?;
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&self.rbuf[self.rstart..self.rstart + HEADER_LEN]);
        let h = Header::decode(&hb)?;
        if h.frame_type != FrameType::Error && !accept(h.frame_type) {
            return Err(ProtoError::UnexpectedFrame { expected, found: h.frame_type });
        }
        h.check_len(limits)?;
        let total = HEADER_LEN + h.payload_len as usize;
        self.fill(total, deadline, during)?;
        let start = self.rstart + HEADER_LEN;
        self.rstart += total;
        if h.frame_type != FrameType::Setup && !self.fds.is_empty() {
            return Err(ProtoError::UnexpectedFd { frame: h.frame_type, found: self.fds.len() });
        }
        if h.frame_type == FrameType::Error {
            let (code, message) = decode_error(&self.rbuf[start..start + h.payload_len as usize])?;
            return Err(ProtoError::Remote { code, message });
        }
        Ok((h, start))
    }

    /// Sends header + `self.wbuf[HEADER_LEN..]` + `extra` as one frame (and `fd` with its first
    /// byte). The caller fills `wbuf` after calling `begin_frame`.
    pub(crate) fn send_frame(
        &mut self,
        ty: FrameType,
        id: u64,
        extra: &[u8],
        fd: Option<RawFd>,
        deadline: Option<Instant>,
    ) -> Result<()> {
        self.check_open()?;
        self.send_inner(ty, id, extra, fd, deadline).inspect_err(|_| self.close())
    }

    /// Clears the write buffer and reserves the header.
    pub(crate) fn begin_frame(&mut self) -> &mut Vec<u8> {
        self.wbuf.clear();
        self.wbuf.extend_from_slice(&[0u8; HEADER_LEN]);
        &mut self.wbuf
    }

    fn send_inner(&mut self, ty: FrameType, id: u64, extra: &[u8], fd: Option<RawFd>, deadline: Option<Instant>) -> Result<()> {
        let payload = self.wbuf.len() - HEADER_LEN + extra.len();
        let payload_len = u32::try_from(payload)
            .map_err(|_| ProtoError::PayloadTooLarge { frame: ty, limit: u64::from(u32::MAX), found: payload as u64 })?;
        let h = Header { frame_type: ty, request_id: id, payload_len }.encode();
        self.wbuf[..HEADER_LEN].copy_from_slice(&h);
        let total = self.wbuf.len() + extra.len();
        let mut sent = 0usize;
        let started = Instant::now();
        let fds: Vec<RawFd> = fd.into_iter().collect();
        while sent < total {
            let head = self.wbuf.len();
            let iov = if sent < head {
                [IoSlice::new(&self.wbuf[sent..]), IoSlice::new(extra)]
            } else {
                [IoSlice::new(&extra[sent - head..]), IoSlice::new(&[])]
            };
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !fds.is_empty() { &cmsg } else { &[] };
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            match sendmsg::<UnixAddr>(self.sock.as_raw_fd(), &iov, cmsgs, flags, None) {
                Ok(n) => sent += n,
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLOUT, deadline, started, "sending a frame")?,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(ProtoError::io("sendmsg", e)),
            }
        }
        Ok(())
    }
}
