//! AF_PACKET sockets for the tests: the agent's own [`PacketSocket`], opened by name, plus
//! batched sends for load and a capture helper.

use std::{
    io,
    time::{Duration, Instant},
};

use vip_agent::packet::PacketSocket;

/// The index of `iface` in the calling thread's namespace.
fn ifindex(iface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(iface).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

pub struct RawSocket {
    sock: PacketSocket,
}

impl RawSocket {
    /// Opens a socket bound to `iface` in the calling thread's namespace, receiving every
    /// protocol. Frames the host itself sends are filtered out by [`RawSocket::recv`].
    pub fn open(iface: &str) -> io::Result<RawSocket> {
        Ok(RawSocket { sock: PacketSocket::open(ifindex(iface)?, true)? })
    }

    /// A socket on `iface` that only sends, for load generators: it receives nothing (not
    /// even a copy of each frame it sends, which a socket of every protocol is given) and
    /// its frames skip the device's queueing discipline (`PACKET_QDISC_BYPASS`).
    pub fn open_sender(iface: &str) -> io::Result<RawSocket> {
        let sock = PacketSocket::open(ifindex(iface)?, false)?;
        let one: libc::c_int = 1;
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawSocket { sock })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame)
    }

    /// Sends `frame` `count` times with sendmmsg, in batches: the cheapest way a process
    /// can offer load. Returns how many were sent.
    pub fn send_many(&self, frame: &[u8], count: usize) -> io::Result<usize> {
        const BATCH: usize = 64;
        let mut iov = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
        // The socket is bound to its interface: no address needed.
        let mut hdrs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|_| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = &mut iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut sent = 0;
        while sent < count {
            let n = (count - sent).min(BATCH);
            let r = unsafe { libc::sendmmsg(self.sock.as_raw_fd(), hdrs.as_mut_ptr(), n as u32, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    continue;
                }
                return Err(e);
            }
            sent += r as usize;
        }
        Ok(sent)
    }

    /// Next frame that arrived on the interface (not one this host sent), or `None` at
    /// `deadline`.
    pub fn recv(&self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // 0 bytes: a frame this host sent, which PacketSocket reports but skips.
            match self.sock.recv(&mut buf, left.max(Duration::from_millis(1)))? {
                Some(n) if n > 0 => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                _ => continue,
            }
        }
    }

    /// Every frame arriving within `window` that `keep` accepts.
    pub fn collect<T>(&self, window: Duration, mut keep: impl FnMut(&[u8]) -> Option<T>) -> Vec<T> {
        let deadline = Instant::now() + window;
        let mut out = vec![];
        while let Some(f) = self.recv(deadline).expect("recv") {
            if let Some(t) = keep(&f) {
                out.push(t);
            }
        }
        out
    }
}
