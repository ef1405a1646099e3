//! End-to-end tests: real `ferry` server and client processes on 127.0.0.1, real FTP, real
//! inotify and polling, real files in temporary trees. One test binary, one module per topic.

mod e2e {
    pub mod util;

    mod beneath;
    mod config;
    mod conflict;
    mod crash;
    mod cross;
    mod durable;
    mod echo;
    mod external;
    mod hostile;
    mod ignore;
    mod lifecycle;
    mod links;
    mod packs;
    mod random;
    mod repack;
    mod restart;
    mod security;
    mod startup;
    mod sync;
}
