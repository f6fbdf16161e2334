//! A certificate authority made at test time with rcgen, for the tests that run the engine
//! with TLS (tests/tls.rs, and multicast's TCP session over TLS in tests/multicast.rs).

use lanpush::tls::ClientTls;

use super::TempFile;

/// A CA and the files made from it.
pub struct Ca {
    pub key: rcgen::KeyPair,
    pub cert: rcgen::Certificate,
    pub pem: TempFile,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).unwrap();
        let pem = TempFile::new(&format!("{name}-ca.pem"), &cert.pem());
        Ca { key, cert, pem }
    }

    /// A certificate and key signed by this CA, as PEM files: `names` in subjectAltName, `cn`
    /// as the subject's Common Name.
    pub fn issue(&self, file: &str, names: &[&str], cn: Option<&str>) -> (TempFile, TempFile) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            TempFile::new(&format!("{file}.pem"), &cert.pem()),
            TempFile::new(&format!("{file}-key.pem"), &key.serialize_pem()),
        )
    }

    pub fn client(&self, cert_key: Option<&(TempFile, TempFile)>) -> ClientTls {
        ClientTls::from_files(
            &self.pem.path,
            cert_key.map(|(c, k)| (c.path.as_path(), k.path.as_path())),
            Some("localhost".into()),
        )
        .unwrap()
    }
}
