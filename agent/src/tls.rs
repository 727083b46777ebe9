//! Pinning the server's TLS key.
//!
//! The agent pins the SHA-256 of the server certificate's public key (its
//! SubjectPublicKeyInfo, as HPKP did: it survives a renewal that keeps the
//! key) in `credential.json` at enrolment, and from then on accepts that key
//! and nothing else from the server, whatever CA signed the certificate.
//!
//! At enrolment the certificate must either have the key named by
//! `server_spki_sha256` in the config (an out-of-band pin: the way to enrol
//! against a self-signed certificate) or be trusted by the system's trust
//! store. A refusal names the key the server presented, so an administrator
//! can compare it with the server's
//! (`openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`)
//! and pin it.
//!
//! Origins are checked more loosely (the pinned key, or the system's trust
//! store): every byte from an origin is verified against the content hash, so
//! TLS there only keeps the package private.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Hex SHA-256 of a certificate's SubjectPublicKeyInfo (DER).
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<String, rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| rustls::Error::General(format!("the server's certificate cannot be parsed: {e}")))?;
    let spki = ee.subject_public_key_info();
    Ok(hex::encode(ring::digest::digest(&ring::digest::SHA256, spki.as_ref())))
}

/// Normalise a pin as people write it (`AB:CD:...`, upper case, spaces): 64 lower-case hex digits.
pub fn parse_pin(s: &str) -> anyhow::Result<String> {
    let h: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect::<String>()
        .to_ascii_lowercase();
    anyhow::ensure!(
        h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
        "server_spki_sha256 {s:?} is not a SHA-256 (64 hex digits, colons allowed)"
    );
    Ok(h)
}

/// Accepts a server whose key has the pinned hash, or (when given) a certificate
/// the system trusts; records the key it saw.
#[derive(Debug)]
pub struct PinVerifier {
    pin: Option<String>,
    system: Option<Arc<dyn ServerCertVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<String>>,
}

impl PinVerifier {
    /// `pin`: the accepted key hash; `system`: also accept what the system's trust store accepts.
    pub fn new(pin: Option<String>, system: bool) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let system = if system {
            let v: Arc<dyn ServerCertVerifier> = Arc::new(
                rustls_platform_verifier::Verifier::new(provider.clone())
                    .map_err(|e| anyhow::anyhow!("loading the system's TLS trust store: {e}"))?,
            );
            Some(v)
        } else {
            None
        };
        Ok(Arc::new(Self {
            pin,
            system,
            provider,
            seen: Mutex::new(None),
        }))
    }

    /// The key hash of the last server certificate this verifier accepted.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A rustls client configuration using this verifier (ring, TLS 1.2 and 1.3, HTTP/1.1).
    pub fn client_config(self: &Arc<Self>) -> anyhow::Result<rustls::ClientConfig> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS protocol versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = spki_sha256(end_entity)?;
        let ok = if self.pin.as_deref() == Some(got.as_str()) {
            Ok(ServerCertVerified::assertion())
        } else if let Some(system) = &self.system {
            system
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    rustls::Error::General(format!(
                        "the server's certificate is not trusted by this system ({e}) and its key \
                         {got} is not pinned: if this is your server (compare with the key of its \
                         certificate), set server_spki_sha256 = \"{got}\" in the agent's config"
                    ))
                })
        } else {
            Err(rustls::Error::General(format!(
                "the server presented a certificate with key {got}, but key {} was pinned at \
                 enrolment: refusing it (an impostor, or the server's key really changed: then \
                 set server_spki_sha256 to the new key in the config, or delete credential.json \
                 and enrol again)",
                self.pin.as_deref().unwrap_or("(none)")
            )))
        };
        if ok.is_ok() {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(got);
        }
        ok
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_normalised_and_checked() {
        let h = "AB:".repeat(31) + "AB";
        assert_eq!(parse_pin(&h).unwrap(), "ab".repeat(32));
        let e = parse_pin("abcd").unwrap_err();
        assert!(e.to_string().contains("server_spki_sha256"), "{e}");
    }
}
