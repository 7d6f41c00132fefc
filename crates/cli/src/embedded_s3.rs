//! An S3-compatible store in this process, on a local folder (s3s + s3s-fs), for `klingq demo`:
//! the worker still talks to it through aws-sdk-s3 over HTTP, so the demo runs the real path.

use std::path::Path;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

/// A running embedded store; it stops when dropped.
pub(crate) struct EmbeddedS3 {
    pub(crate) endpoint: String,
    pub(crate) access_key: String,
    pub(crate) secret_key: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the folder `root` as an S3 store on a free loopback port.
pub(crate) async fn start(root: &Path) -> anyhow::Result<EmbeddedS3> {
    std::fs::create_dir_all(root)
        .with_context(|| format!("creating the demo store folder {}", root.display()))?;
    let filesystem = s3s_fs::FileSystem::new(root)
        .map_err(|error| anyhow::anyhow!("opening the demo store folder: {error:?}"))?;
    let access_key = "klingq-demo".to_owned();
    let secret_key = "klingq-demo-secret".to_owned();
    let service = {
        let mut builder = S3ServiceBuilder::new(filesystem);
        builder.set_auth(SimpleAuth::from_single(
            access_key.clone(),
            secret_key.clone(),
        ));
        builder.build()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let connection = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    });
    Ok(EmbeddedS3 {
        endpoint,
        access_key,
        secret_key,
        task,
    })
}
