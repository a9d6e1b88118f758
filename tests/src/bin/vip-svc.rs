//! A stand-in for a virtual server's program in the hook tests: listens on TCP ADDR:PORT
//! (bound even before the address is local: IP_FREEBIND, as a service started by an
//! `acquire` hook must) and answers every connection with TEXT and a newline.
//!
//! `vip-svc ADDR:PORT TEXT`

use std::{io::Write, net::SocketAddr};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(text)) = (args.next(), args.next()) else {
        eprintln!("usage: vip-svc ADDR:PORT TEXT");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    let sock = free_bind(addr);
    for mut c in sock.incoming().flatten() {
        let _ = writeln!(c, "{text}");
    }
}

/// A listening socket with IP_FREEBIND set before bind.
fn free_bind(addr: SocketAddr) -> std::net::TcpListener {
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let one: libc::c_int = 1;
        let sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(fd, libc::SOL_IP, libc::IP_FREEBIND, &one as *const _ as *const libc::c_void, sz);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const libc::c_void, sz);
        let SocketAddr::V4(a) = addr else { panic!("IPv4 only") };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let r = libc::bind(fd, &sin as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t);
        assert_eq!(r, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 64), 0, "listen");
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}
