//! A QMP server around the toy VM of `baton_qmp::demo`, to try clients against:
//!
//! ```text
//! cargo run -p baton-qmp --example qmp-demo -- /tmp/demo.qmp [127.0.0.1:4444]
//! socat - UNIX-CONNECT:/tmp/demo.qmp
//! {"execute": "qmp_capabilities"}
//! {"execute": "stop"}
//! ```
//!
//! It runs until a client executes `quit`.

use std::net::SocketAddr;
use std::process::ExitCode;

use baton_qmp::{demo, QmpServer};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: qmp-demo SOCKET_PATH [TCP_ADDR]");
        return ExitCode::from(2);
    };
    let mut builder = QmpServer::builder().unix(path);
    if let Some(addr) = args.next() {
        match addr.parse::<SocketAddr>() {
            Ok(a) => builder = builder.tcp(a),
            Err(e) => {
                eprintln!("qmp-demo: bad TCP address {addr:?}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let vm = demo::DemoVm::new(builder.event_sender());
    let server = match builder.start(demo::registry(vm.clone())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qmp-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = server.tcp_addr() {
        eprintln!("qmp-demo: also listening on {addr}");
    }
    eprintln!("qmp-demo: ready; `quit` stops it");
    vm.wait_quit(None);
    server.shutdown();
    ExitCode::SUCCESS
}
