//! The in-memory data set: compact encounter and document records, the patient pool, and the
//! sorted index of visible encounters that makes every list page `O(log n + limit)`.
//!
//! Records are deliberately small (fixed-size ids minted through `id`, interned strings, integer
//! timestamps as `timestamp` defines them) so a million encounters fit comfortably in memory.
//! Note text and transcript turns are never stored: `content` derives them from the seed and the
//! document id, and only edited notes are kept here. This module does no I/O, no locking and no
//! JSON; the `Simulator` wraps it in a lock and `render` turns records into wire bytes.

use std::collections::HashMap;
use std::num::NonZeroU32;

use time::{Date, OffsetDateTime};

use crate::content::{self, ContentParams, deciseconds};
use crate::id::{Id, mix64};
use crate::model::{DocKind, Document, Encounter, NewEncounter, Patient, Visibility};
use crate::options::{QueryPrecision, SimOptions};
use crate::timestamp::{MICROSECOND, instant, nanos};

/// Handle of an interned string: its index plus one, so `Option<Sym>` stays four bytes (document
/// records hold three of them, a million encounters hold about two million documents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Sym(NonZeroU32);

/// Strings that repeat across records (types, statuses, titles, names) are stored once.
#[derive(Default)]
pub(crate) struct Interner {
    strings: Vec<Box<str>>,
    index: HashMap<Box<str>, Sym>,
}

impl Interner {
    pub(crate) fn intern(&mut self, text: &str) -> Sym {
        if let Some(&sym) = self.index.get(text) {
            return sym;
        }
        let sym = u32::try_from(self.strings.len() + 1)
            .ok()
            .and_then(NonZeroU32::new)
            .map(Sym)
            .expect("fewer than 2^32 distinct strings");
        self.strings.push(text.into());
        self.index.insert(text.into(), sym);
        sym
    }

    pub(crate) fn get(&self, sym: Sym) -> &str {
        &self.strings[sym.0.get() as usize - 1]
    }

    /// The string's number in this vocabulary (from 1): what a server that sends enum codes
    /// sends instead ([`crate::SimOptions::labels_as_numbers`]).
    pub(crate) fn code(sym: Sym) -> u32 {
        sym.0.get()
    }
}

/// The interned vocabulary generation draws from.
pub(crate) struct Vocab {
    pub(crate) ambient: Sym,
    pub(crate) clinical_documentation: Sym,
    pub(crate) completed: Sym,
    pub(crate) in_progress: Sym,
    pub(crate) pending_review: Sym,
    pub(crate) processing: Sym,
    /// The status of an ambient transcript document whose transcript is final.
    pub(crate) final_document: Sym,
    pub(crate) ambient_transcript: Sym,
    pub(crate) document: Sym,
    pub(crate) ambient_title: Sym,
    pub(crate) ambient_variant: Sym,
    pub(crate) note_titles: Vec<Sym>,
    /// `(schema_type, title)` pairs the document route refuses.
    pub(crate) unsupported: Vec<(Sym, Sym)>,
    pub(crate) first_names: Vec<Sym>,
    pub(crate) last_names: Vec<Sym>,
}

impl Vocab {
    fn new(syms: &mut Interner, final_document: &str) -> Vocab {
        let mut all = |list: &[&str]| list.iter().map(|s| syms.intern(s)).collect::<Vec<_>>();
        let note_titles = all(content::NOTE_TITLES);
        let first_names = all(content::FIRST_NAMES);
        let last_names = all(content::LAST_NAMES);
        let unsupported = content::UNSUPPORTED_TYPES
            .iter()
            .map(|(schema, title)| (syms.intern(schema), syms.intern(title)))
            .collect();
        Vocab {
            ambient: syms.intern("ambient"),
            clinical_documentation: syms.intern("clinical_documentation"),
            completed: syms.intern("completed"),
            in_progress: syms.intern("in_progress"),
            pending_review: syms.intern("pending_review"),
            processing: syms.intern("processing"),
            final_document: syms.intern(final_document),
            ambient_transcript: syms.intern("ambient_transcript"),
            document: syms.intern("document"),
            ambient_title: syms.intern("Ambient transcript"),
            ambient_variant: syms.intern("ambient"),
            note_titles,
            unsupported,
            first_names,
            last_names,
        }
    }
}

/// Which route family serves a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DocClass {
    Note,
    Ambient,
    Unsupported,
}

/// A document summary plus what is needed to derive its content.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DocRec {
    pub(crate) id: Id,
    pub(crate) class: DocClass,
    pub(crate) schema_type: Sym,
    pub(crate) title: Option<Sym>,
    pub(crate) status: Option<Sym>,
    pub(crate) workflow_variant: Option<Sym>,
    /// Audio length in tenths of a second, so the wire value is exact (e.g. `842.4`).
    pub(crate) audio_ds: Option<u32>,
    pub(crate) created: i64,
    pub(crate) updated: i64,
    /// Ambient transcript is final (the transcript route serves it).
    pub(crate) is_final: bool,
    /// Ambient transcript is one of the ~2 MB ones.
    pub(crate) large: bool,
    /// Note text carries emoji, CJK and combining marks.
    pub(crate) unicode: bool,
}

pub(crate) struct PatientRec {
    pub(crate) id: Box<str>,
    pub(crate) first_name: Option<Sym>,
    pub(crate) last_name: Option<Sym>,
    pub(crate) date_of_birth: Option<Date>,
    /// Only `patient_id` is sent.
    pub(crate) withheld: bool,
}

pub(crate) struct EncRec {
    pub(crate) id: Id,
    pub(crate) encounter_type: Sym,
    pub(crate) status: Sym,
    pub(crate) created: i64,
    pub(crate) updated: i64,
    pub(crate) date_of_service: i64,
    pub(crate) patient: u32,
    pub(crate) visibility: Visibility,
    pub(crate) docs: Vec<DocRec>,
}

impl EncRec {
    pub(crate) fn doc(&self, document_id: &str) -> Option<&DocRec> {
        let id = Id::parse(document_id)?;
        self.docs.iter().find(|d| d.id == id)
    }

    fn doc_mut(&mut self, document_id: &str) -> Option<&mut DocRec> {
        let id = Id::parse(document_id)?;
        self.docs.iter_mut().find(|d| d.id == id)
    }
}

/// Position of an encounter in `Store::encounters`; never reused, records are never deleted.
pub(crate) type Slot = u32;

/// One page of the visible index.
pub(crate) struct Page {
    pub(crate) total: usize,
    pub(crate) slots: Vec<Slot>,
}

/// The order a list page is read in: ascending `(created_at, encounter_id)`, its exact reverse,
/// or newest instant first with each instant's ties still ascending
/// (`SimOptions::desc_ties_ascending`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Asc,
    Desc,
    DescTiesAsc,
}

pub(crate) struct Store {
    pub(crate) organization_id: Box<str>,
    pub(crate) params: ContentParams,
    pub(crate) syms: Interner,
    pub(crate) vocab: Vocab,
    pub(crate) rng: fastrand::Rng,
    encounters: Vec<EncRec>,
    by_id: HashMap<Id, Slot>,
    /// Visible encounters ordered by `(created_at, encounter_id)`.
    index: Vec<(i64, Id, Slot)>,
    /// Encounters unavailable to the key, ordered the same way (see `unavailable_in`).
    unavailable: Vec<(i64, Id, Slot)>,
    pub(crate) patients: Vec<PatientRec>,
    patient_by_id: HashMap<Box<str>, u32>,
    note_overrides: HashMap<Id, Box<str>>,
    /// Each mutated encounter's own last change (status or visibility change, restore, explicit
    /// `updated_at`); an encounter missing here has its `created_at` as base. Kept beside the
    /// records, not in them, so `EncRec` stays small for the millions never mutated.
    bases: HashMap<Slot, i64>,
    /// Every stored `created_at` and explicit `updated_at` is a whole multiple of this many
    /// nanoseconds (`QueryPrecision::data_unit`).
    data_unit: i64,
    /// `SimOptions::micro_data`: the data unit is never coarser than a microsecond.
    micro_data: bool,
    id_seq: u64,
    id_key: u64,
    ambient_docs: u64,
    notes: u64,
    unsupported_docs: u64,
}

impl Store {
    pub(crate) fn new(opts: &SimOptions) -> Store {
        let mut syms = Interner::default();
        let mut vocab = Vocab::new(&mut syms, &opts.final_document_status);
        if opts.nul_in_text {
            for name in vocab.first_names.iter_mut().step_by(3) {
                let with_nul = format!("{}\u{0}Null", syms.get(*name));
                *name = syms.intern(&with_nul);
            }
        }
        Store {
            organization_id: opts.organization_id.as_str().into(),
            params: ContentParams {
                seed: opts.seed,
                turns_per_transcript: ordered(opts.turns_per_transcript),
                unicode_every: opts.unicode_every,
                large_transcript_every: opts.large_transcript_every,
                nul_in_text: opts.nul_in_text,
            },
            syms,
            vocab,
            rng: fastrand::Rng::with_seed(mix64(opts.seed ^ 0x5eed_da7a)),
            encounters: Vec::new(),
            by_id: HashMap::new(),
            index: Vec::new(),
            unavailable: Vec::new(),
            patients: Vec::new(),
            patient_by_id: HashMap::new(),
            note_overrides: HashMap::new(),
            bases: HashMap::new(),
            data_unit: opts.query_precision.data_unit(opts.micro_data),
            micro_data: opts.micro_data,
            id_seq: 0,
            id_key: mix64(opts.seed ^ 0x1d50_f1d5),
            ambient_docs: 0,
            notes: 0,
            unsupported_docs: 0,
        }
    }

    pub(crate) fn reserve(&mut self, encounters: usize, patients: usize) {
        self.encounters.reserve(encounters);
        self.by_id.reserve(encounters);
        self.index.reserve(encounters);
        self.patients.reserve(patients);
        self.patient_by_id.reserve(patients);
    }

    fn mint(&mut self, prefix: &[u8; 3]) -> Id {
        let id = Id::mint(prefix, self.id_seq, self.id_key);
        self.id_seq += 1;
        id
    }

    /// Adds a patient with generated demographics under `id` (a fresh one when `None`).
    pub(crate) fn add_patient(&mut self, id: Option<&str>) -> u32 {
        let id: Box<str> = match id {
            Some(id) => id.into(),
            None => self.mint(b"pat").as_str().into(),
        };
        let rng = &mut self.rng;
        let withheld = rng.u32(0..100) < 12;
        let first_name = Some(self.vocab.first_names[rng.usize(..self.vocab.first_names.len())]);
        let last_name = Some(self.vocab.last_names[rng.usize(..self.vocab.last_names.len())]);
        // Days from 1930-01-01 to 2023-12-31; 1930-01-01 is Julian day 2_425_977.
        let date_of_birth = (rng.u32(0..100) >= 4)
            .then(|| Date::from_julian_day(2_425_977 + rng.i32(0..34_333)).expect("in range"));
        let slot = u32::try_from(self.patients.len()).expect("fewer than 2^32 patients");
        self.patient_by_id.insert(id.clone(), slot);
        self.patients.push(PatientRec {
            id,
            first_name: first_name.filter(|_| !withheld),
            last_name: last_name.filter(|_| !withheld),
            date_of_birth: date_of_birth.filter(|_| !withheld),
            withheld,
        });
        slot
    }

    fn patient_for(&mut self, id: Option<&str>) -> u32 {
        match id.and_then(|id| self.patient_by_id.get(id)) {
            Some(&slot) => slot,
            None => self.add_patient(id),
        }
    }

    /// Builds a document record, advancing the every-Nth counters for large transcripts and
    /// unicode notes so generated and inserted documents follow the same rules.
    pub(crate) fn new_doc(&mut self, kind: DocKind, created: i64, updated: i64) -> DocRec {
        let id = self.mint(b"doc");
        let v = &self.vocab;
        let mut doc = DocRec {
            id,
            class: DocClass::Note,
            schema_type: v.document,
            title: None,
            status: None,
            workflow_variant: None,
            audio_ds: None,
            created,
            updated,
            is_final: false,
            large: false,
            unicode: false,
        };
        match kind {
            DocKind::Note => {
                doc.title = Some(v.note_titles[self.rng.usize(..v.note_titles.len())]);
                doc.unicode = every_nth(self.notes, self.params.unicode_every);
                self.notes += 1;
            }
            DocKind::Ambient | DocKind::AmbientFinal => {
                doc.class = DocClass::Ambient;
                doc.schema_type = v.ambient_transcript;
                doc.title = Some(v.ambient_title);
                doc.workflow_variant = Some(v.ambient_variant);
                doc.large = every_nth(self.ambient_docs, self.params.large_transcript_every);
                self.ambient_docs += 1;
                if kind == DocKind::AmbientFinal {
                    doc.is_final = true;
                    doc.status = Some(v.final_document);
                    doc.audio_ds = Some(content::audio_duration_ds(self.params.seed, &doc.id, doc.large));
                } else {
                    doc.status = Some(v.processing);
                }
            }
            DocKind::Unsupported => {
                let (schema, title) =
                    v.unsupported[(self.unsupported_docs % v.unsupported.len() as u64) as usize];
                self.unsupported_docs += 1;
                doc.class = DocClass::Unsupported;
                doc.schema_type = schema;
                doc.title = Some(title);
            }
        }
        doc
    }

    /// Appends a generated encounter without touching the index; call `rebuild_index` after a
    /// batch.
    pub(crate) fn push_generated(&mut self, rec: EncRec) {
        let slot = Slot::try_from(self.encounters.len()).expect("fewer than 2^32 encounters");
        self.by_id.insert(rec.id, slot);
        self.encounters.push(rec);
    }

    pub(crate) fn mint_encounter_id(&mut self) -> Id {
        self.mint(b"enc")
    }

    pub(crate) fn rebuild_index(&mut self) {
        self.index = self
            .encounters
            .iter()
            .zip(0..)
            .filter(|(rec, _)| rec.visibility == Visibility::Visible)
            .map(|(rec, slot)| (rec.created, rec.id, slot))
            .collect();
        self.index.sort_unstable();
    }

    /// Switches the precision timestamps given from outside are truncated to from now on
    /// (`QueryPrecision::data_unit`); what is stored already is left as it is.
    pub(crate) fn set_query_precision(&mut self, precision: QueryPrecision) {
        self.data_unit = precision.data_unit(self.micro_data);
    }

    /// An instant given from outside (an inserted `created_at`, an explicit `updated_at`) at the
    /// store's precision. The wall clock is microseconds already; generated values are at the
    /// store's precision.
    pub(crate) fn precise(&self, nanos: i64) -> i64 {
        nanos - nanos.rem_euclid(self.data_unit)
    }

    pub(crate) fn insert(&mut self, new: &NewEncounter, now: i64) -> Id {
        let created = self.precise(nanos(new.created_at));
        // A record that just appeared was last modified now, even when back-dated.
        let updated = created.max(now);
        let (id, slot) = self.push_new(new, created, updated);
        self.index_insert(created, id, slot);
        id
    }

    /// Appends a record built from `new` with the given instants, without touching the index.
    pub(crate) fn push_new(&mut self, new: &NewEncounter, created: i64, updated: i64) -> (Id, Slot) {
        let encounter_type = self.syms.intern(&new.encounter_type);
        let status = self.syms.intern(&new.status);
        let patient = self.patient_for(new.patient_id.as_deref());
        let id = self.mint_encounter_id();
        let docs = new
            .docs
            .iter()
            .map(|&kind| self.new_doc(kind, created, updated))
            .collect();
        let slot = Slot::try_from(self.encounters.len()).expect("fewer than 2^32 encounters");
        self.encounters.push(EncRec {
            id,
            encounter_type,
            status,
            created,
            updated,
            date_of_service: created,
            patient,
            visibility: Visibility::Visible,
            docs,
        });
        self.by_id.insert(id, slot);
        (id, slot)
    }

    /// Inserts `count` visible encounters shaped like `NewEncounter::at`, all created at
    /// `created_at`. The index is merged once: only the entries already at that instant are
    /// re-sorted with the new ones, so the cost is one pass over the index plus `count log count`.
    pub(crate) fn insert_bulk(&mut self, created_at: OffsetDateTime, count: usize, now: i64) -> Vec<Id> {
        let created = self.precise(nanos(created_at));
        let updated = created.max(now);
        let new = NewEncounter::at(created_at);
        self.encounters.reserve(count);
        self.by_id.reserve(count);
        let mut fresh: Vec<(i64, Id, Slot)> = (0..count)
            .map(|_| {
                let (id, slot) = self.push_new(&new, created, updated);
                (created, id, slot)
            })
            .collect();
        let ids = fresh.iter().map(|e| e.1).collect();
        let lo = self.index.partition_point(|e| e.0 < created);
        let hi = self.index.partition_point(|e| e.0 <= created);
        fresh.extend_from_slice(&self.index[lo..hi]);
        fresh.sort_unstable();
        self.index.splice(lo..hi, fresh);
        ids
    }

    fn index_insert(&mut self, created: i64, id: Id, slot: Slot) {
        let key = (created, id, slot);
        let at = self.index.partition_point(|entry| *entry < key);
        self.index.insert(at, key);
    }

    fn index_remove(&mut self, created: i64, id: Id, slot: Slot) {
        let key = (created, id, slot);
        if let Ok(at) = self.index.binary_search(&key) {
            self.index.remove(at);
        }
    }

    pub(crate) fn slot(&self, encounter_id: &str) -> Option<Slot> {
        self.by_id.get(&Id::parse(encounter_id)?).copied()
    }

    pub(crate) fn rec(&self, slot: Slot) -> &EncRec {
        &self.encounters[slot as usize]
    }

    pub(crate) fn patient(&self, rec: &EncRec) -> &PatientRec {
        &self.patients[rec.patient as usize]
    }

    pub(crate) fn visible_len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn encounter_count(&self) -> usize {
        self.encounters.len()
    }

    /// Visible encounters with `start <= created_at < end`, paged in the requested direction.
    pub(crate) fn page(
        &self,
        start: Option<i64>,
        end: Option<i64>,
        offset: usize,
        limit: usize,
        direction: Direction,
    ) -> Page {
        let lo = start.map_or(0, |s| self.index.partition_point(|e| e.0 < s));
        let hi = end.map_or(self.index.len(), |e| self.index.partition_point(|x| x.0 < e));
        let hi = hi.max(lo);
        let total = hi - lo;
        let take = limit.min(total.saturating_sub(offset));
        let slots = match direction {
            Direction::Asc => {
                let first = lo + offset.min(total);
                self.index[first..first + take].iter().map(|e| e.2).collect()
            }
            Direction::Desc => {
                let top = hi - offset.min(total);
                self.index[top - take..top].iter().rev().map(|e| e.2).collect()
            }
            Direction::DescTiesAsc => {
                // Instants from the newest down, each instant's records in ascending ID order.
                let mut slots = Vec::with_capacity(take);
                let (mut skip, mut top) = (offset, hi);
                while slots.len() < take && top > lo {
                    let instant = self.index[top - 1].0;
                    let bottom = lo + self.index[lo..top].partition_point(|e| e.0 < instant);
                    let group = &self.index[bottom..top];
                    let from = skip.min(group.len());
                    skip -= from;
                    let wanted = take - slots.len();
                    slots.extend(group[from..].iter().take(wanted).map(|e| e.2));
                    top = bottom;
                }
                slots
            }
        };
        Page { total, slots }
    }

    /// Every encounter visible or unavailable to the key with `start <= created_at < end`, paged
    /// in `(created_at, encounter_id)` order (`Desc`: reversed) before the unavailable ones are
    /// dropped from the page (`SimOptions::filter_after_limit`); `total` counts both.
    pub(crate) fn page_then_filter(
        &self,
        start: Option<i64>,
        end: Option<i64>,
        offset: usize,
        limit: usize,
        descending: bool,
    ) -> Page {
        let range = |index: &[(i64, Id, Slot)]| {
            let lo = start.map_or(0, |s| index.partition_point(|e| e.0 < s));
            let hi = end.map_or(index.len(), |e| index.partition_point(|x| x.0 < e));
            index[lo..hi.max(lo)].to_vec()
        };
        let mut all = range(&self.index);
        all.extend(range(&self.unavailable));
        all.sort_unstable();
        if descending {
            all.reverse();
        }
        let total = all.len();
        let slots = all
            .iter()
            .skip(offset)
            .take(limit)
            .filter(|e| self.encounters[e.2 as usize].visibility == Visibility::Visible)
            .map(|e| e.2)
            .collect();
        Page { total, slots }
    }

    /// Every visible encounter slot in ascending `(created_at, encounter_id)` order.
    pub(crate) fn visible_slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.index.iter().map(|e| e.2)
    }

    fn touch(&mut self, slot: Slot, now: i64) -> &mut EncRec {
        let rec = &mut self.encounters[slot as usize];
        rec.updated = now.max(rec.updated + MICROSECOND);
        rec
    }

    pub(crate) fn set_visibility(&mut self, slot: Slot, visibility: Visibility, now: i64) {
        let rec = self.touch(slot, now);
        let was_visible = rec.visibility == Visibility::Visible;
        rec.visibility = visibility;
        let (created, id, updated) = (rec.created, rec.id, rec.updated);
        self.bases.insert(slot, updated);
        match (was_visible, visibility == Visibility::Visible) {
            (true, false) => self.index_remove(created, id, slot),
            (false, true) => self.index_insert(created, id, slot),
            _ => {}
        }
        let key = (created, id, slot);
        let at = self.unavailable.partition_point(|entry| *entry < key);
        let listed = self.unavailable.get(at) == Some(&key);
        match (listed, matches!(visibility, Visibility::Unavailable(_))) {
            (false, true) => self.unavailable.insert(at, key),
            (true, false) => {
                self.unavailable.remove(at);
            }
            _ => {}
        }
    }

    /// How many encounters unavailable to the key were created in `[start, end)`: what a list
    /// total that counts them adds (`SimOptions::total_counts_unavailable`).
    pub(crate) fn unavailable_in(&self, start: Option<i64>, end: Option<i64>) -> usize {
        let lo = start.map_or(0, |s| self.unavailable.partition_point(|e| e.0 < s));
        let hi = end.map_or(self.unavailable.len(), |e| {
            self.unavailable.partition_point(|x| x.0 < e)
        });
        hi.saturating_sub(lo)
    }

    pub(crate) fn set_status(&mut self, slot: Slot, status: &str, now: i64) {
        let status = self.syms.intern(status);
        let rec = self.touch(slot, now);
        rec.status = status;
        let updated = rec.updated;
        self.bases.insert(slot, updated);
    }

    /// Moves the encounter's `created_at` to `created` (a vendor correcting a visit's creation
    /// time: a clock or time-zone fix, a record re-imported), keeping its place in the visible and
    /// unavailable indexes true. Bumps `updated_at`.
    pub(crate) fn move_created(&mut self, slot: Slot, created: OffsetDateTime, now: i64) {
        let created = self.precise(nanos(created));
        let rec = self.touch(slot, now);
        rec.updated = rec.updated.max(created);
        let (old, id, visibility, updated) = (rec.created, rec.id, rec.visibility, rec.updated);
        rec.created = created;
        self.bases.insert(slot, updated);
        if visibility == Visibility::Visible {
            self.index_remove(old, id, slot);
            self.index_insert(created, id, slot);
        }
        if let Ok(at) = self.unavailable.binary_search(&(old, id, slot)) {
            self.unavailable.remove(at);
            let key = (created, id, slot);
            let at = self.unavailable.partition_point(|entry| *entry < key);
            self.unavailable.insert(at, key);
        }
    }

    /// Sets `updated_at` to `updated` (earlier or later than before) and makes it the
    /// encounter's base, as a vendor restoring a row from a backup would.
    pub(crate) fn set_updated(&mut self, slot: Slot, updated: OffsetDateTime) {
        let updated = self.precise(nanos(updated));
        self.encounters[slot as usize].updated = updated;
        self.bases.insert(slot, updated);
    }

    /// Sets the status and sets `updated_at` to `updated` (see `set_updated`).
    pub(crate) fn restore_status(&mut self, slot: Slot, status: &str, updated: OffsetDateTime) {
        let status = self.syms.intern(status);
        self.encounters[slot as usize].status = status;
        self.set_updated(slot, updated);
    }

    /// Moves a document to another encounter. The document counts as modified now, strictly
    /// after the target's current `updated_at`; then both encounters' `updated_at` are
    /// recomputed (see `recompute_updated`), so the source's may go backwards.
    pub(crate) fn move_document(
        &mut self,
        from: Slot,
        document_id: &str,
        to: Slot,
        now: i64,
    ) -> Result<(), String> {
        if from == to {
            return Err(format!("document {document_id} is already on this encounter"));
        }
        let source = &mut self.encounters[from as usize];
        let at = Id::parse(document_id)
            .and_then(|id| source.docs.iter().position(|d| d.id == id))
            .ok_or_else(|| format!("no document {document_id} on encounter {}", source.id.as_str()))?;
        let mut doc = source.docs.remove(at);
        let target = &mut self.encounters[to as usize];
        doc.updated = now
            .max(doc.updated + MICROSECOND)
            .max(target.updated + MICROSECOND);
        target.docs.push(doc);
        self.recompute_updated(from);
        self.recompute_updated(to);
        Ok(())
    }

    /// The recompute rule of a vendor that derives `updated_at` from what remains: the latest of
    /// the encounter's base (its last own change, else its `created_at`) and its documents'
    /// `updated_at`.
    fn recompute_updated(&mut self, slot: Slot) {
        let rec = &mut self.encounters[slot as usize];
        let base = self.bases.get(&slot).copied().unwrap_or(rec.created);
        rec.updated = rec.docs.iter().map(|d| d.updated).fold(base, i64::max);
    }

    pub(crate) fn add_document(&mut self, slot: Slot, kind: DocKind, now: i64) -> Id {
        let updated = now.max(self.encounters[slot as usize].updated + MICROSECOND);
        let doc = self.new_doc(kind, now, updated);
        let rec = self.touch(slot, now);
        rec.docs.push(doc);
        doc.id
    }

    /// Applies `change` to one document and bumps both its and the encounter's `updated_at`;
    /// does nothing when the encounter has no such document.
    fn change_doc(
        &mut self,
        slot: Slot,
        document_id: &str,
        now: i64,
        change: impl FnOnce(&mut DocRec, &Vocab, &ContentParams),
    ) {
        let (vocab, params) = (&self.vocab, &self.params);
        let rec = &mut self.encounters[slot as usize];
        let Some(doc) = rec.doc_mut(document_id) else {
            return;
        };
        change(doc, vocab, params);
        doc.updated = now.max(doc.updated + MICROSECOND);
        rec.updated = doc.updated.max(rec.updated + MICROSECOND);
    }

    /// Finalizes an ambient transcript. Returns `Err` with a description when the document is
    /// missing or not an ambient transcript.
    pub(crate) fn finalize_transcript(
        &mut self,
        slot: Slot,
        document_id: &str,
        now: i64,
    ) -> Result<(), String> {
        match self.rec(slot).doc(document_id).map(|d| d.class) {
            Some(DocClass::Ambient) => {}
            Some(_) => return Err(format!("document {document_id} is not an ambient transcript")),
            None => return Err(format!("no document {document_id} on this encounter")),
        }
        self.change_doc(slot, document_id, now, |doc, vocab, params| {
            doc.is_final = true;
            doc.status = Some(vocab.final_document);
            doc.audio_ds = Some(content::audio_duration_ds(params.seed, &doc.id, doc.large));
        });
        Ok(())
    }

    /// Replaces a note's text. Returns `Err` with a description when the document is missing or
    /// not a note.
    pub(crate) fn edit_note(
        &mut self,
        slot: Slot,
        document_id: &str,
        text: &str,
        now: i64,
        quietly: bool,
    ) -> Result<(), String> {
        let doc = match self.rec(slot).doc(document_id) {
            Some(doc) if doc.class == DocClass::Note => doc.id,
            Some(_) => return Err(format!("document {document_id} is not a note")),
            None => return Err(format!("no document {document_id} on this encounter")),
        };
        if quietly {
            let doc = self.encounters[slot as usize]
                .doc_mut(document_id)
                .expect("the note was found above");
            doc.updated = now.max(doc.updated + MICROSECOND);
        } else {
            self.change_doc(slot, document_id, now, |_, _, _| {});
        }
        self.note_overrides.insert(doc, text.into());
        Ok(())
    }

    /// The note's current text: the edited text if any, else the derived one.
    pub(crate) fn note_text(&self, doc: &DocRec) -> NoteText {
        match self.note_overrides.get(&doc.id) {
            Some(text) => NoteText::Edited(text.to_string()),
            None => NoteText::Derived {
                seed: self.params.seed,
                title: doc.title.map(|t| self.syms.get(t).to_owned()),
                unicode: doc.unicode,
                nul: self.params.nul_in_text,
            },
        }
    }

    pub(crate) fn to_public(&self, slot: Slot) -> Encounter {
        let rec = self.rec(slot);
        let patient = self.patient(rec);
        let name = |sym: Option<Sym>| sym.map(|s| self.syms.get(s).to_owned());
        Encounter {
            encounter_id: rec.id.as_str().to_owned(),
            organization_id: self.organization_id.to_string(),
            encounter_type: self.syms.get(rec.encounter_type).to_owned(),
            status: self.syms.get(rec.status).to_owned(),
            created_at: instant(rec.created),
            updated_at: instant(rec.updated),
            date_of_service: instant(rec.date_of_service),
            patient: Patient {
                patient_id: patient.id.to_string(),
                first_name: name(patient.first_name),
                last_name: name(patient.last_name),
                date_of_birth: patient.date_of_birth,
            },
            documents: rec
                .docs
                .iter()
                .map(|doc| Document {
                    document_id: doc.id.as_str().to_owned(),
                    schema_type: self.syms.get(doc.schema_type).to_owned(),
                    title: name(doc.title),
                    status: name(doc.status),
                    workflow_variant: name(doc.workflow_variant),
                    audio_duration_seconds: doc.audio_ds.map(deciseconds),
                    created_at: instant(doc.created),
                    updated_at: instant(doc.updated),
                })
                .collect(),
        }
    }
}

/// A note's text, or what is needed to derive it outside the store lock.
pub(crate) enum NoteText {
    Edited(String),
    Derived {
        seed: u64,
        title: Option<String>,
        unicode: bool,
        /// Append `content::NUL_SUFFIX` to a unicode note.
        nul: bool,
    },
}

impl NoteText {
    pub(crate) fn into_text(self, doc: &Id) -> String {
        match self {
            NoteText::Edited(text) => text,
            NoteText::Derived {
                seed,
                title,
                unicode,
                nul,
            } => {
                let mut text = content::note_text(seed, doc, title.as_deref().unwrap_or("Note"), unicode);
                if unicode && nul {
                    text.push_str(content::NUL_SUFFIX);
                }
                text
            }
        }
    }
}

fn every_nth(count: u64, every: u32) -> bool {
    every != 0 && (count + 1).is_multiple_of(u64::from(every))
}

fn ordered((a, b): (u32, u32)) -> (u32, u32) {
    (a.min(b), a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_compact() {
        // A million encounters with two documents each must fit in a few hundred MB.
        assert!(
            std::mem::size_of::<DocRec>() <= 64,
            "{}",
            std::mem::size_of::<DocRec>()
        );
        assert!(
            std::mem::size_of::<EncRec>() <= 80,
            "{}",
            std::mem::size_of::<EncRec>()
        );
    }

    #[test]
    fn descending_with_ascending_ties_keeps_each_instant_in_id_order() {
        let mut store = Store::new(&SimOptions::default());
        let base = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        // Three instants holding 1, 3 and 2 records.
        for (minute, count) in [(0, 1), (1, 3), (2, 2)] {
            for _ in 0..count {
                let at = base + time::Duration::minutes(minute);
                store.insert(&NewEncounter::at(at), nanos(at));
            }
        }
        let key = |slot: Slot| (store.rec(slot).created, store.rec(slot).id);
        let asc: Vec<_> = store.page(None, None, 0, 10, Direction::Asc).slots;
        let mut expected: Vec<_> = asc.iter().map(|&s| key(s)).collect();
        expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for offset in 0..7 {
            for limit in 1..8 {
                let page = store.page(None, None, offset, limit, Direction::DescTiesAsc);
                assert_eq!(page.total, 6);
                let got: Vec<_> = page.slots.iter().map(|&s| key(s)).collect();
                let want: Vec<_> = expected.iter().skip(offset).take(limit).copied().collect();
                assert_eq!(got, want, "offset {offset}, limit {limit}");
            }
        }
        // Bounded to the middle instant: its three records in ascending ID order.
        let b = nanos(base);
        let minute = 60_000_000_000;
        let middle = store.page(
            Some(b + minute),
            Some(b + 2 * minute),
            0,
            10,
            Direction::DescTiesAsc,
        );
        let ids: Vec<_> = middle.slots.iter().map(|&s| key(s)).collect();
        assert!(ids.len() == 3 && ids.is_sorted(), "{ids:?}");
    }

    #[test]
    fn paging_in_both_directions_respects_offset_and_bounds() {
        let mut store = Store::new(&SimOptions::default());
        let base = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        for minute in 0..10 {
            let at = base + time::Duration::minutes(minute);
            store.insert(&NewEncounter::at(at), nanos(at));
        }
        let created = |slot: Slot| store.rec(slot).created;
        let asc = store.page(None, None, 2, 3, Direction::Asc);
        assert_eq!(asc.total, 10);
        let times: Vec<_> = asc.slots.iter().map(|&s| created(s)).collect();
        let minute = 60_000_000_000;
        let b = nanos(base);
        assert_eq!(times, vec![b + 2 * minute, b + 3 * minute, b + 4 * minute]);
        let desc = store.page(Some(b + minute), Some(b + 5 * minute), 1, 10, Direction::Desc);
        assert_eq!(desc.total, 4);
        let times: Vec<_> = desc.slots.iter().map(|&s| created(s)).collect();
        assert_eq!(times, vec![b + 3 * minute, b + 2 * minute, b + minute]);
        assert!(store.page(None, None, 10, 5, Direction::Desc).slots.is_empty());
        assert_eq!(
            store.page(Some(b + minute), Some(b), 0, 5, Direction::Asc).total,
            0
        );
    }
}
