//! TLS for the store's connections (`state.postgres.tls`), through rustls with the crypto
//! provider the rest of the daemon uses (aws-lc-rs): `require` encrypts without checking who
//! answers (libpq's `sslmode=require`); `verify-full` also checks the certificate chain against
//! the system's roots, or only `ca_file`'s, and its name against the URL's host.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PgTls;
use crate::store::ledger::LedgerError;

/// The connector for `tls`. With `off` it is never used (the connection's sslmode is
/// `disable`), and holds no roots.
pub(super) fn connector(
    tls: PgTls,
    ca_file: Option<&Path>,
) -> Result<MakeRustlsConnect, LedgerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| LedgerError::Store(format!("TLS set-up: {e}")))?;
    let config = match tls {
        PgTls::Off => builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
        PgTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
        PgTls::VerifyFull => builder
            .with_root_certificates(roots(ca_file)?)
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `ca_file`'s certificates, else the system's.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, LedgerError> {
    let mut roots = RootCertStore::empty();
    let certs = match ca_file {
        Some(f) => crate::config::read_ca_file(f)
            .map_err(|e| LedgerError::Store(format!("state.postgres.ca_file: {e}")))?,
        // A certificate the system store holds but rustls cannot use is skipped, as by every
        // other client of the store; none at all is an error below.
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _unusable) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(LedgerError::Store(match ca_file {
            Some(f) => format!(
                "state.postgres.ca_file: no usable CA certificate in {}",
                f.display()
            ),
            None => "tls = \"verify-full\" found no CA certificates on this system (install \
                     ca-certificates, or give state.postgres.ca_file)"
                .into(),
        }));
    }
    Ok(roots)
}

/// `require`: any certificate is accepted, but the handshake's signatures are still checked
/// against it (the server holds its key), so the session is encrypted end to end with whoever
/// answered. Whoever that is: an impostor that asks for a cleartext password gets it, so
/// `require` protects against eavesdroppers only; `verify-full` against impostors too.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why the TLS handshake was refused, when it was refused by TLS itself (a certificate that is
/// not trusted or not for this host, no common protocol): a setting to fix, not an outage to
/// wait out. None for anything else (a connection cut during the handshake is an outage).
pub(super) fn refused(e: &tokio_postgres::Error) -> Option<String> {
    use std::error::Error as _;
    let io = e.source()?.downcast_ref::<std::io::Error>()?;
    let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
    let hint = match tls {
        rustls::Error::InvalidCertificate(_) => {
            " (tls = \"verify-full\" checks the server's certificate against the system's CA \
             roots, or those of state.postgres.ca_file, and its name against the URL's host)"
        }
        _ => "",
    };
    Some(format!("TLS to PostgreSQL refused: {tls}{hint}"))
}
