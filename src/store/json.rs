//! An encounter's JSON as the warehouse keeps and compares it: without the signed links a
//! server may embed in it ([`stored_json_and_hash`]), and in the canonical form change detection
//! compares ([`same_content`], `encounters.content_hash`).

use std::borrow::Cow;

use serde_json::Value;

use super::hex;

/// A listed encounter's JSON as the warehouse stores it, and its content hash
/// (`encounters.content_hash`, what change detection compares): SHA-256, in hex, of the
/// canonical form of [`same_content`], so that a server rendering the same record differently
/// (keys in another order, other whitespace or escapes, documents in another order, links signed
/// anew) is not taken for a change, which would fetch its notes and transcripts again.
///
/// The stored JSON is the text received, without the temporary access links a server may embed
/// in it (a recording's signed URL in a document summary, say): the contract says signed URLs
/// are never to be stored. A link is an absolute `http(s)` URL with a query or a fragment (where
/// signatures and tokens go), or any URL under `audio_url` (the contract's name for a signed
/// URL); the expiry beside a removed link (`expires_at`, `<key>_expires_at`, and for a `*_url`
/// key `<name>_expires_at`) goes with it. `redact`, when given, edits the stored JSON further
/// (the privacy policy's fields), never the hashed one. A record without links or redaction is
/// kept byte for byte; text that is not JSON is kept and hashed as it is. The text is parsed
/// once, whatever is done to it.
pub fn stored_json_and_hash(raw: String, redact: Option<&dyn Fn(&mut Value)>) -> (String, String) {
    let Ok(mut value) = serde_json::from_str::<Value>(&raw) else {
        let hash = sha256_hex(&raw);
        return (raw, hash);
    };
    let links = remove_signed_links(&mut value);
    let stored = match redact {
        Some(redact) => {
            let mut stored = value.clone();
            redact(&mut stored);
            stored.to_string()
        }
        None if links => value.to_string(),
        None => raw,
    };
    canonicalize(&mut value);
    (stored, sha256_hex(&value.to_string()))
}

/// Whether two renderings of an encounter say the same: equal once each is in canonical form —
/// without signed links, parsed and written again with object keys sorted, no whitespace,
/// strings and numbers as serde_json writes them again (one form of escapes and of a float's
/// text; an integer and a float stay apart), the `documents` ordered by `document_id` (its
/// order is still kept, in `documents.position`, whenever the record is written). Text that is
/// not JSON is compared as it is.
pub fn same_content(a: &str, b: &str) -> bool {
    a == b || canonical_json(a) == canonical_json(b)
}

fn canonical_json(json: &str) -> Cow<'_, str> {
    let Ok(mut value) = serde_json::from_str::<Value>(json) else {
        return Cow::Borrowed(json);
    };
    remove_signed_links(&mut value);
    canonicalize(&mut value);
    Cow::Owned(value.to_string())
}

fn canonicalize(value: &mut Value) {
    if let Some(documents) = value.get_mut("documents").and_then(Value::as_array_mut) {
        let id = |d: &Value| d.get("document_id").and_then(Value::as_str).map(str::to_owned);
        documents.sort_by_cached_key(id);
    }
    value.sort_all_objects();
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(text.as_bytes()))
}

/// Removes [`stored_json_and_hash`]'s links from `value` and everything it holds; whether any
/// was.
fn remove_signed_links(value: &mut Value) -> bool {
    match value {
        Value::Object(fields) => {
            let links: Vec<String> = fields
                .iter()
                .filter(|(key, value)| value.as_str().is_some_and(|text| signed_link(key, text)))
                .map(|(key, _)| key.clone())
                .collect();
            for key in &links {
                fields.remove(key);
                fields.remove(&format!("{key}_expires_at"));
                if let Some(name) = key.strip_suffix("_url") {
                    fields.remove(&format!("{name}_expires_at"));
                }
            }
            if !links.is_empty() {
                fields.remove("expires_at");
            }
            fields
                .values_mut()
                .fold(!links.is_empty(), |any, value| remove_signed_links(value) || any)
        }
        Value::Array(items) => {
            let before = items.len();
            items.retain(|item| !item.as_str().is_some_and(|text| signed_link("", text)));
            let removed = items.len() != before;
            items
                .iter_mut()
                .fold(removed, |any, item| remove_signed_links(item) || any)
        }
        _ => false,
    }
}

/// Whether `text`, the value of `key`, is a link [`stored_json_and_hash`] removes.
fn signed_link(key: &str, text: &str) -> bool {
    let Some((scheme, rest)) = text.trim_start().split_once("://") else {
        return false;
    };
    (scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http"))
        && (key == "audio_url" || rest.contains(['?', '#']))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content_hash(json: &str) -> String {
        stored_json_and_hash(json.to_owned(), None).1
    }

    #[test]
    fn a_record_rendered_another_way_is_the_same_and_any_change_of_a_value_is_not() {
        let record = r#"{"encounter_id":"enc_1","status":"completed","audio":842.4,
            "patient":{"patient_id":"pat_1","first_name":"Jos\u00e9"},
            "documents":[{"document_id":"doc_b","title":"Note"},{"document_id":"doc_a","title":null}]}"#;
        let rendered_otherwise = r#"{ "documents" : [ {"title":null, "document_id":"doc_a"},
            {"title":"Note","document_id":"doc_b"} ], "patient": {"first_name":"José",
            "patient_id":"pat_1"}, "audio": 842.40, "status":"completed", "encounter_id":"enc_1" }"#;
        assert!(same_content(record, rendered_otherwise));
        assert_eq!(content_hash(record), content_hash(rendered_otherwise));
        for changed in [
            record.replace("completed", "amended"),
            record.replace("Jos\\u00e9", "Jose"),
            record.replace(r#""title":null"#, r#""title":"Form""#),
            record.replace("842.4", "842.5"),
            record.replace("842.4", r#""842.4""#),
            record.replace(r#",{"document_id":"doc_a","title":null}"#, ""),
        ] {
            assert_ne!(changed, record, "the replacement must apply");
            assert!(!same_content(record, &changed), "{changed}");
            assert_ne!(content_hash(record), content_hash(&changed), "{changed}");
        }
        // Text that is not JSON is compared, stored and hashed as it is.
        assert!(same_content("not json", "not json"));
        assert!(!same_content("not json", "not  json"));
        assert_eq!(stored_json_and_hash("not json".to_owned(), None).0, "not json");
    }

    /// A record whose links carry `token`, in the shapes a server may embed them.
    fn with_links(token: &str) -> String {
        format!(
            r#"{{"encounter_id": "enc_1", "status": "completed",
                "patient": {{"patient_id": "pat_1", "photo_url": "HTTPS://cdn.test/p.png#{token}"}},
                "portal_url": "https://app.test/encounters/enc_1",
                "question": "Why? https is not a link here",
                "consent": {{"expires_at": "2027-01-01T00:00:00Z"}},
                "links": ["https:\/\/files.test\/a.pdf?X-Amz-Signature={token}", "https://app.test/x"],
                "share": {{"url": "https:\u002f\u002fshare.test/s?sig={token}", "consent_expires_at": "2027-02-01"}},
                "documents": [
                  {{"document_id": "doc_1", "schema_type": "ambient_transcript",
                    "recording": {{"audio_url": "https://media.test/doc_1.wav?token={token}",
                                   "expires_at": "2026-05-01T10:15:{second}Z", "format": "wav"}}}},
                  {{"document_id": "doc_2", "schema_type": "ambient_transcript",
                    "audio_url": "https://media.test/{token}/doc_2.wav",
                    "audio_url_expires_at": "2026-05-01T10:15:{second}Z",
                    "audio_expires_at": "2026-05-01T10:15:{second}Z"}}]}}"#,
            second = &token[..2],
        )
    }

    #[test]
    fn signed_links_are_neither_stored_nor_compared_and_a_record_without_any_is_kept_as_received() {
        let (a, b) = (with_links("17abc0ffee"), with_links("42def1dead"));
        let ((stored_a, hash_a), (stored_b, hash_b)) = (
            stored_json_and_hash(a.clone(), None),
            stored_json_and_hash(b.clone(), None),
        );
        assert_eq!(hash_a, hash_b, "links signed anew count as a change");
        assert!(same_content(&a, &b));
        // A record an earlier release stored with its links says the same as one without.
        assert!(same_content(&a, &stored_b));
        for json in [&stored_a, &stored_b] {
            for gone in [
                "17abc",
                "42def",
                "audio_url",
                "X-Amz",
                "HTTPS://",
                "10:15:",
                "share.test",
            ] {
                assert!(!json.contains(gone), "{gone} in {json}");
            }
            for kept in [
                "https://app.test/encounters/enc_1",
                "https://app.test/x",
                "Why? https is not a link here",
                r#""consent":{"expires_at":"2027-01-01T00:00:00Z"}"#,
                r#""share":{"consent_expires_at":"2027-02-01"}"#,
                r#""format":"wav""#,
                r#""patient":{"patient_id":"pat_1"}"#,
            ] {
                assert!(json.contains(kept), "{kept} not in {json}");
            }
        }
        // Anything else that changes is a change.
        let edited = a.replace(r#""format": "wav""#, r#""format": "mp3""#);
        assert_ne!(edited, a);
        assert_ne!(content_hash(&edited), hash_a);

        let plain = r#"{"encounter_id": "enc_1",  "portal_url": "https://app.test/e/enc_1"}"#;
        assert_eq!(stored_json_and_hash(plain.to_owned(), None).0, plain);
    }
}
