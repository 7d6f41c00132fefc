//! TLS for tests: a throwaway certificate authority and a server certificate for `127.0.0.1` and
//! `localhost`, made with the `openssl` command line tool in a folder of their own (removed on
//! drop), and a TLS exchange with a server through `openssl s_client`, so the testkit needs no
//! TLS crate of its own.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// Valid for a few days: a test run never comes near the end, and a skewed clock still accepts it.
const DAYS: &str = "7";

const CA_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca

[dn]
CN = klingq test CA

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
";

const SERVER_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = localhost

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A throwaway CA and a server certificate (P-256 keys) signed by it for `127.0.0.1` and
/// `localhost`, as PEM files; the folder is removed on drop. Nothing trusts the CA but what is
/// told to: `redis-cli --cacert`, `redis-server --tls-ca-cert-file`, or a client's root store.
pub struct TlsFiles {
    dir: PathBuf,
}

impl TlsFiles {
    /// Generates the CA and the server certificate in a new temporary folder.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "klingq-tls-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = Self { dir };
        files.write()?;
        Ok(files)
    }

    fn write(&self) -> anyhow::Result<()> {
        let ca_config = self.dir.join("ca.cnf");
        let server_config = self.dir.join("server.cnf");
        std::fs::write(&ca_config, CA_CONFIG)?;
        std::fs::write(&server_config, SERVER_CONFIG)?;
        let csr = self.dir.join("server.csr");
        let serial = format!("0x{:016x}", rand::random::<u64>() >> 1);
        openssl(
            &self.dir,
            &[
                &"req",
                &"-x509",
                &"-new",
                &"-nodes",
                &"-newkey",
                &"ec",
                &"-pkeyopt",
                &"ec_paramgen_curve:prime256v1",
                &"-days",
                &DAYS,
                &"-config",
                &ca_config,
                &"-keyout",
                &self.ca_key_file(),
                &"-out",
                &self.ca_file(),
            ],
        )?;
        openssl(
            &self.dir,
            &[
                &"req",
                &"-new",
                &"-nodes",
                &"-newkey",
                &"ec",
                &"-pkeyopt",
                &"ec_paramgen_curve:prime256v1",
                &"-config",
                &server_config,
                &"-keyout",
                &self.key_file(),
                &"-out",
                &csr,
            ],
        )?;
        openssl(
            &self.dir,
            &[
                &"x509",
                &"-req",
                &"-in",
                &csr,
                &"-CA",
                &self.ca_file(),
                &"-CAkey",
                &self.ca_key_file(),
                &"-set_serial",
                &serial,
                &"-days",
                &DAYS,
                &"-extfile",
                &server_config,
                &"-extensions",
                &"v3_server",
                &"-out",
                &self.cert_file(),
            ],
        )?;
        Ok(())
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM): what a client trusts to verify the server.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn ca_key_file(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The server certificate (PEM), for `127.0.0.1` and `localhost`.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    /// The server's private key (PEM, unencrypted).
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The `redis-server` arguments serving TLS only, on `port`, with these files; clients need
    /// no certificate of their own.
    pub fn server_args(&self, port: u16) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string().into(),
        ];
        for (flag, file) in [
            ("--tls-cert-file", self.cert_file()),
            ("--tls-key-file", self.key_file()),
            ("--tls-ca-cert-file", self.ca_file()),
        ] {
            args.push(flag.into());
            args.push(file.into());
        }
        args.extend(["--tls-auth-clients".into(), "no".into()]);
        args
    }

    /// The `redis-cli` arguments to reach such a server, verifying it against the CA.
    pub fn redis_cli_args(&self) -> Vec<OsString> {
        vec!["--tls".into(), "--cacert".into(), self.ca_file().into()]
    }

    /// `openssl s_client` connected to `127.0.0.1:port` (verified against the CA): what is
    /// written to its stdin goes to the server, its stdout is what the server sends, nothing
    /// else. Killed on drop.
    pub(crate) fn connect(&self, port: u16) -> anyhow::Result<Child> {
        Command::new("openssl")
            .args(["s_client", "-quiet", "-nocommands", "-verify_return_error"])
            .args(["-verify_ip", "127.0.0.1", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(self.ca_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting openssl s_client (install it: apt-get install openssl)")
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&dyn AsRef<OsStr>]) -> anyhow::Result<()> {
    let output = std::process::Command::new("openssl")
        .args(args.iter().map(|arg| arg.as_ref()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (install it: apt-get install openssl)")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.first()
                .map(|arg| arg.as_ref().to_string_lossy())
                .unwrap_or_default(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
