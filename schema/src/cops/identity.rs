//! Who a COPS peer is under mutual TLS: the name in its certificate.
//!
//! The PDP refuses a PEPID other than the name in the enforcer's client
//! certificate, and the enforcer announces that name as its PEPID: both
//! ends read it here, the same way.

/// The name a certificate (DER) gives its holder: the subject's common
/// name, or without one the first DNS subject alternative name. `None` for
/// a certificate that does not parse or names nothing.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_names_nobody() {
        assert_eq!(certificate_identity(b""), None);
        assert_eq!(certificate_identity(&[0x30, 0x03, 0x02, 0x01, 0x00]), None);
    }
}
