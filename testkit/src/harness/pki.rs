//! A throwaway PKI for TLS tests, made with the `openssl` command: a CA, a
//! server certificate for 127.0.0.1 and a client certificate, all signed by
//! the CA, valid for a day.

use super::{run_checked, HarnessError};
use std::path::Path;
use std::process::Command;

/// Writes `ca.pem`/`ca.key`, `server.pem`/`server.key` (subjectAltName
/// IP:127.0.0.1, serverAuth) and `client.pem`/`client.key` (clientAuth) into
/// `dir`.
pub fn test_pki(dir: &Path) -> Result<(), HarnessError> {
    let openssl = |args: &[&str]| {
        run_checked(
            Command::new("openssl").current_dir(dir).args(args),
            &format!("openssl {}", args.first().copied().unwrap_or("")),
        )
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=qosloop test CA",
    ]);
    openssl(&ca)?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(HarnessError::io(format!("writing {name}")))
    };
    write(
        "server.ext",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    write("client.ext", "extendedKeyUsage=clientAuth\n")?;
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let subj = format!("/CN=qosloop {who}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&req)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
}
