//! [`select`]: one pass over the accepted events that hands each event to the consumers that
//! read it.
//!
//! Most operators read a few event names (command-queue health reads four, triage the errors
//! and the feedback). Fed the whole collection, each would visit every event, and each visit
//! costs a reference-count round trip on the event and a cache miss. One table lookup per event
//! here ([`Subscriber`]s by event name and route) gives every consumer only its own events.

use std::borrow::Borrow;

use sightline_schemas::registry::Registry;
use sightline_schemas::{Event, EventName, EventType};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::progress::operate::FrontierInterest;

use crate::window::Time;

/// The events a consumer reads, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Names {
    /// Every event.
    All,
    /// These names only.
    Only(Vec<EventName>),
}

impl Names {
    /// The catalog events named in `names`, and the events of type `types`. A name not in
    /// the catalog selects nothing (callers name catalog events; their tests check it).
    pub fn of(names: &[&str], types: &[EventType]) -> Names {
        let mut selected: Vec<EventName> = names
            .iter()
            .filter_map(|n| EventName::from_name(n))
            .collect();
        selected.extend(EventName::all().filter(|n| types.contains(&n.spec().event_type)));
        selected.sort_unstable();
        selected.dedup();
        Names::Only(selected)
    }

    /// The names any of `sets` selects.
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a Names>) -> Names {
        let mut all: Vec<EventName> = Vec::new();
        for set in sets {
            match set {
                Names::All => return Names::All,
                Names::Only(names) => all.extend(names),
            }
        }
        all.sort_unstable();
        all.dedup();
        Names::Only(all)
    }

    /// Whether `name` is selected.
    pub fn contains(&self, name: EventName) -> bool {
        match self {
            Names::All => true,
            Names::Only(names) => names.contains(&name),
        }
    }
}

/// One consumer of [`select`]: the events of one route (or both) with the names it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    /// `Some(restricted)`: only the events of that route; `None`: both.
    pub restricted: Option<bool>,
    /// The names it reads.
    pub names: Names,
}

impl Subscriber {
    /// Whether this consumer reads an event named `name` on the route `restricted`.
    pub fn reads(&self, name: EventName, restricted: bool) -> bool {
        self.restricted.is_none_or(|r| r == restricted) && self.names.contains(name)
    }
}

/// For each event name and route, the consumers (bits, by index) that read it.
struct Table(Vec<u64>);

impl Table {
    fn new(subscribers: &[Subscriber]) -> Table {
        let names = Registry::embedded().events().len();
        let mut bits = vec![0u64; names * 2];
        for name in EventName::all() {
            for restricted in [false, true] {
                for (i, s) in subscribers.iter().enumerate() {
                    if s.reads(name, restricted) {
                        bits[Table::slot(name, restricted)] |= 1 << i;
                    }
                }
            }
        }
        Table(bits)
    }

    fn slot(name: EventName, restricted: bool) -> usize {
        usize::from(u16::from(name)) * 2 + usize::from(restricted)
    }

    fn of(&self, event: &Event) -> u64 {
        self.0
            .get(Table::slot(event.event_name, event.is_restricted()))
            .copied()
            .unwrap_or(0)
    }
}

/// One stream per subscriber, in their order, each with the events it reads (at most 64
/// subscribers: more is a bug of the caller and is refused with a panic at build time).
pub fn select<'s, E>(
    events: StreamVec<'s, Time, (E, Time, isize)>,
    subscribers: &[Subscriber],
) -> Vec<StreamVec<'s, Time, (E, Time, isize)>>
where
    E: Borrow<Event> + Clone + 'static,
{
    assert!(subscribers.len() <= 64, "select: at most 64 subscribers");
    let table = Table::new(subscribers);
    let mut builder = OperatorBuilder::new("Select".to_owned(), events.scope());
    let mut input = builder.new_input(events, Pipeline);
    builder.set_notify_for(0, FrontierInterest::Never);
    let (mut outputs, streams): (Vec<_>, Vec<_>) = subscribers
        .iter()
        .map(|_| builder.new_output::<Vec<(E, Time, isize)>>())
        .unzip();
    builder.build(move |_| {
        let mut parts: Vec<Vec<(E, Time, isize)>> = vec![Vec::new(); outputs.len()];
        // How many events each consumer's last part held: a part handed on leaves an empty
        // buffer behind, which is given that capacity at once instead of growing by doubling
        // (copying its events each time). One pass: a second pass over the events
        // to count them first would read each event twice.
        let mut sizes: Vec<usize> = vec![0; outputs.len()];
        move |_frontiers| {
            let mut handles: Vec<_> = outputs.iter_mut().map(|o| o.activate()).collect();
            input.for_each_stamp(|cap, data| {
                for batch in data {
                    for (event, time, diff) in batch.drain(..) {
                        let mut bits = table.of(event.borrow());
                        // Each consumer but the last gets a clone; the last gets the event
                        // itself (one reference-count round trip fewer per event).
                        while bits != 0 {
                            let i = bits.trailing_zeros() as usize;
                            bits &= bits - 1;
                            if bits == 0 {
                                parts[i].push((event, time, diff));
                                break;
                            }
                            parts[i].push((event.clone(), time, diff));
                        }
                    }
                }
                for ((part, handle), size) in
                    parts.iter_mut().zip(handles.iter_mut()).zip(&mut sizes)
                {
                    *size = part.len();
                    // Sends the records and hands back an empty (possibly recycled) buffer.
                    handle.give(&cap, part);
                    part.clear();
                    part.reserve(*size);
                }
            });
        }
    });
    streams
}
