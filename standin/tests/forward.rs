//! `cachalot-standin forward` as a process: bytes flow tcp → unix → tcp through two forwarders
//! (the way the fixture bridges network namespaces), the chosen port is written to the port
//! file, and SIGTERM ends the process with status 0 and removes its socket file. No root needed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_cachalot-standin");

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn forward(listen: &str, connect: &str, port_file: Option<&Path>) -> Process {
    let mut command = Command::new(BIN);
    command
        .args(["forward", "--listen", listen, "--connect", connect])
        .stdin(Stdio::null());
    if let Some(file) = port_file {
        command.arg("--port-file").arg(file);
    }
    Process(command.spawn().unwrap())
}

/// Polls `condition` every 20 ms until it holds or `deadline` passes.
fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_from_tcp_through_a_unix_socket_to_tcp_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bridge.sock");
    let port_file = dir.path().join("port");
    let echo_port = echo_server().await;

    let _inner = forward(
        &format!("unix:{}", socket.display()),
        &format!("tcp:127.0.0.1:{echo_port}"),
        None,
    );
    wait_for("the unix socket", Duration::from_secs(10), || {
        socket.exists()
    });
    let _outer = forward(
        "tcp:127.0.0.1:0",
        &format!("unix:{}", socket.display()),
        Some(&port_file),
    );
    wait_for("the port file", Duration::from_secs(10), || {
        port_file.exists()
    });
    let port: u16 = std::fs::read_to_string(&port_file)
        .unwrap()
        .parse()
        .unwrap();

    for round in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 ^ round).collect();
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(&payload).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let receive = async {
            tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut echoed))
                .await
                .expect("echo in time")
                .unwrap();
        };
        tokio::join!(send, receive);
        assert_eq!(echoed, payload, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_removes_the_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gone.sock");
    let mut process = forward(
        &format!("unix:{}", socket.display()),
        "tcp:127.0.0.1:9",
        None,
    );
    wait_for("the unix socket", Duration::from_secs(10), || {
        socket.exists()
    });
    let pid = Pid::from_raw(i32::try_from(process.0.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let mut status = None;
    wait_for("the exit", Duration::from_secs(10), || {
        status = process.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_closes_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let missing = dir.path().join("nobody.sock");
    let _process = forward(
        "tcp:127.0.0.1:0",
        &format!("unix:{}", missing.display()),
        Some(&port_file),
    );
    wait_for("the port file", Duration::from_secs(10), || {
        port_file.exists()
    });
    let port: u16 = std::fs::read_to_string(&port_file)
        .unwrap()
        .parse()
        .unwrap();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
