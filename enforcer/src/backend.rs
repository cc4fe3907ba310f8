//! Everything that touches the kernel, behind one small trait: the real
//! backend (rtnetlink + nftables), a dry run that prints what it would do,
//! and an in-memory fake for unit tests.

use crate::nfnl::Nftnl;
use crate::nft::fake::FakeNft;
pub use crate::nft::fake::FakeTable;
use crate::nft::model::Batch;
use crate::nft::{self, TableState};
use crate::render::Layout;
use crate::tc::{ClassInfo, HtbClass, KernelError, QdiscInfo, Rtnl, TcHandle, TcOp};
use std::collections::BTreeMap;
use std::process::Command;

/// The kernel as the enforcer sees it.
pub trait KernelBackend {
    /// Short name for logs and the probe (`htb+nft`, `dry-run`, `fake`).
    fn name(&self) -> &'static str;
    /// The interface's index, `None` when it does not exist.
    fn ifindex(&mut self, interface: &str) -> Option<u32>;
    fn qdiscs(&mut self, ifindex: u32) -> Result<Vec<QdiscInfo>, KernelError>;
    /// Classes of qdisc `major` on the interface; `major` 0: of every qdisc.
    fn classes(&mut self, ifindex: u32, major: u16) -> Result<Vec<ClassInfo>, KernelError>;
    /// Executes `ops` in order, one result each; no rollback here.
    fn tc(&mut self, ops: &[TcOp]) -> Vec<Result<(), KernelError>>;
    /// The table of `layout`, `None` when it does not exist.
    fn read_table(&mut self, layout: &Layout) -> Result<Option<TableState>, String>;
    /// The index of IFB device `name`, created (and up) when missing.
    fn ensure_ifb(&mut self, name: &str) -> Result<u32, String>;
    /// Deletes interface `name` if it exists (its qdiscs go with it).
    fn delete_link(&mut self, name: &str) -> Result<(), String>;
    /// Applies `batch` as one atomic nftables transaction.
    fn nft(&mut self, batch: &Batch) -> Result<(), String>;
    /// `tc(ops)` and `nft(batch)`, at the same time where the backend can
    /// (the kernel takes them under different locks); in turn otherwise.
    fn tc_and_nft(
        &mut self,
        ops: &[TcOp],
        batch: &Batch,
    ) -> (Vec<Result<(), KernelError>>, Result<(), String>) {
        let tc = self.tc(ops);
        let nft = self.nft(batch);
        (tc, nft)
    }
}

/// HTB over rtnetlink, nftables over nf_tables netlink (one batch per call);
/// the table is read back through `nft -j` (at start and for `status`).
#[derive(Debug)]
pub struct LinuxBackend {
    rtnl: Rtnl,
    nftnl: Nftnl,
    nft_binary: String,
}

impl LinuxBackend {
    /// Opens the netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<LinuxBackend, KernelError> {
        Ok(LinuxBackend {
            rtnl: Rtnl::open()?,
            nftnl: Nftnl::open()?,
            nft_binary: "nft".into(),
        })
    }

    pub fn rtnl(&mut self) -> &mut Rtnl {
        &mut self.rtnl
    }
}

fn nft_missing(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        "capability nftables missing: the nft binary is not installed (Debian package nftables)"
            .to_owned()
    } else {
        format!("running nft: {e}")
    }
}

impl KernelBackend for LinuxBackend {
    fn name(&self) -> &'static str {
        "htb+nft"
    }
    fn ifindex(&mut self, interface: &str) -> Option<u32> {
        crate::sys::if_index(interface)
    }
    fn qdiscs(&mut self, ifindex: u32) -> Result<Vec<QdiscInfo>, KernelError> {
        self.rtnl.qdiscs(ifindex)
    }
    fn classes(&mut self, ifindex: u32, major: u16) -> Result<Vec<ClassInfo>, KernelError> {
        self.rtnl.classes(ifindex, major)
    }
    fn tc(&mut self, ops: &[TcOp]) -> Vec<Result<(), KernelError>> {
        self.rtnl.execute(ops)
    }
    fn read_table(&mut self, layout: &Layout) -> Result<Option<TableState>, String> {
        let table = layout.nft_table();
        let mut args = vec!["-j", "-a", "list", "table"];
        args.extend(table.split(' '));
        let out = Command::new(&self.nft_binary)
            .args(&args)
            .output()
            .map_err(|e| nft_missing(&e))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(format!("nft list table {table}: {}", err.trim()));
        }
        nft::parse_table(&String::from_utf8_lossy(&out.stdout), layout).map(Some)
    }
    fn ensure_ifb(&mut self, name: &str) -> Result<u32, String> {
        if let Some(i) = crate::sys::if_index(name) {
            return Ok(i);
        }
        self.rtnl
            .create_ifb(name)
            .map_err(|e| format!("capability ifb missing: creating IFB device {name}: {e}"))?;
        crate::sys::if_index(name).ok_or_else(|| format!("IFB device {name} vanished"))
    }
    fn delete_link(&mut self, name: &str) -> Result<(), String> {
        match crate::sys::if_index(name) {
            None => Ok(()),
            Some(i) => self
                .rtnl
                .delete_link(i)
                .map_err(|e| format!("deleting {name}: {e}")),
        }
    }
    fn nft(&mut self, batch: &Batch) -> Result<(), String> {
        self.nftnl.apply(batch)
    }
    fn tc_and_nft(
        &mut self,
        ops: &[TcOp],
        batch: &Batch,
    ) -> (Vec<Result<(), KernelError>>, Result<(), String>) {
        // The sockets were opened in the enforcer's namespace; a socket
        // keeps its namespace whatever thread uses it.
        let (rtnl, nftnl) = (&mut self.rtnl, &mut self.nftnl);
        std::thread::scope(|s| {
            let nft = s.spawn(|| nftnl.apply(batch));
            let tc = rtnl.execute(ops);
            let nft = nft
                .join()
                .unwrap_or_else(|_| Err("the nf_tables thread panicked".into()));
            (tc, nft)
        })
    }
}

/// Prints every operation instead of making it; the kernel looks empty.
#[derive(Debug, Default)]
pub struct DryRunBackend {
    /// What would have been done, in order.
    pub log: Vec<String>,
    /// Echo each operation to standard output as well.
    pub print: bool,
}

impl DryRunBackend {
    fn say(&mut self, line: String) {
        if self.print {
            println!("{line}");
        }
        self.log.push(line);
    }
}

impl KernelBackend for DryRunBackend {
    fn name(&self) -> &'static str {
        "dry-run"
    }
    fn ifindex(&mut self, interface: &str) -> Option<u32> {
        Some(crate::sys::if_index(interface).unwrap_or(0))
    }
    fn qdiscs(&mut self, _: u32) -> Result<Vec<QdiscInfo>, KernelError> {
        Ok(Vec::new())
    }
    fn classes(&mut self, _: u32, _: u16) -> Result<Vec<ClassInfo>, KernelError> {
        Ok(Vec::new())
    }
    fn tc(&mut self, ops: &[TcOp]) -> Vec<Result<(), KernelError>> {
        ops.iter()
            .map(|op| {
                self.say(format!("netlink: {op}"));
                Ok(())
            })
            .collect()
    }
    fn read_table(&mut self, _: &Layout) -> Result<Option<TableState>, String> {
        Ok(None)
    }
    fn ensure_ifb(&mut self, name: &str) -> Result<u32, String> {
        self.say(format!(
            "netlink: RTM_NEWLINK create {name} type ifb up (if missing)"
        ));
        Ok(crate::sys::if_index(name).unwrap_or(0))
    }
    fn delete_link(&mut self, name: &str) -> Result<(), String> {
        self.say(format!("netlink: RTM_DELLINK {name}"));
        Ok(())
    }
    fn nft(&mut self, batch: &Batch) -> Result<(), String> {
        self.say(format!(
            "nftables transaction:\n{}",
            batch.to_string().trim_end()
        ));
        Ok(())
    }
}

/// An in-memory kernel: HTB state and the typed nftables model executed by
/// [`FakeTable`], with failure injection.
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub interfaces: BTreeMap<String, u32>,
    pub root_qdisc: Option<QdiscInfo>,
    /// Leaf qdiscs of classes, by the class they hang from.
    pub child_qdiscs: BTreeMap<u32, QdiscInfo>,
    /// The steering filter's `(first_major, groups, first_minor)`.
    pub steer: Option<(u16, u16, u16)>,
    pub classes: BTreeMap<u32, HtbClass>,
    pub table: Option<FakeTable>,
    pub tc_messages: usize,
    pub nft_transactions: usize,
    /// The next nft transaction fails with this text.
    pub fail_next_nft: Option<String>,
    /// Creating or changing this class fails (EINVAL).
    pub fail_class: Option<TcHandle>,
}

impl FakeKernel {
    pub fn with_interface(name: &str, index: u32) -> FakeKernel {
        let mut k = FakeKernel::default();
        k.interfaces.insert(name.to_owned(), index);
        k
    }

    fn einval(text: &str) -> KernelError {
        KernelError {
            errno: libc::EINVAL,
            message: Some(text.to_owned()),
        }
    }

    fn apply_op(&mut self, op: &TcOp) -> Result<(), KernelError> {
        match op {
            TcOp::CreateQdisc {
                ifindex,
                handle,
                parent,
                ..
            } if parent.0 != 0 => {
                if !self.classes.contains_key(&parent.0) {
                    return Err(Self::einval("no such parent class"));
                }
                if self.child_qdiscs.contains_key(&parent.0)
                    || self.child_qdiscs.values().any(|q| q.handle == *handle)
                {
                    return Err(KernelError {
                        errno: libc::EEXIST,
                        message: None,
                    });
                }
                self.child_qdiscs.insert(
                    parent.0,
                    QdiscInfo {
                        ifindex: *ifindex,
                        handle: *handle,
                        parent: parent.0,
                        kind: "htb".into(),
                    },
                );
            }
            TcOp::CreateQdisc {
                ifindex, handle, ..
            } => {
                if self.root_qdisc.is_some() {
                    return Err(KernelError {
                        errno: libc::EEXIST,
                        message: None,
                    });
                }
                self.root_qdisc = Some(QdiscInfo {
                    ifindex: *ifindex,
                    handle: *handle,
                    parent: u32::MAX,
                    kind: "htb".into(),
                });
            }
            TcOp::DeleteQdisc { .. } => {
                self.root_qdisc = None;
                self.child_qdiscs.clear();
                self.classes.clear();
                self.steer = None;
            }
            TcOp::Steer {
                first_major,
                groups,
                first_minor,
                ..
            } => {
                if self.root_qdisc.is_none() {
                    return Err(Self::einval("no qdisc"));
                }
                self.steer = Some((*first_major, *groups, *first_minor));
            }
            TcOp::CreateClass { class, .. } | TcOp::ChangeClass { class, .. } => {
                if self.fail_class == Some(class.classid) {
                    return Err(Self::einval("injected failure"));
                }
                let exists = self.classes.contains_key(&class.classid.0);
                if matches!(op, TcOp::CreateClass { .. }) == exists {
                    return Err(Self::einval("create of existing / change of missing class"));
                }
                self.classes.insert(class.classid.0, *class);
            }
            TcOp::DeleteClass { classid, .. } => {
                if self.classes.values().any(|c| c.parent == *classid) {
                    return Err(KernelError {
                        errno: libc::EBUSY,
                        message: Some("class has children".into()),
                    });
                }
                self.classes
                    .remove(&classid.0)
                    .ok_or_else(|| Self::einval("no such class"))?;
                // A class's leaf qdisc goes with it, and that qdisc's classes.
                if let Some(q) = self.child_qdiscs.remove(&classid.0) {
                    let major = q.handle.major();
                    self.classes.retain(|_, c| c.classid.major() != major);
                }
            }
        }
        Ok(())
    }
}

impl KernelBackend for FakeKernel {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn ifindex(&mut self, interface: &str) -> Option<u32> {
        self.interfaces.get(interface).copied()
    }
    fn qdiscs(&mut self, _: u32) -> Result<Vec<QdiscInfo>, KernelError> {
        Ok(self
            .root_qdisc
            .iter()
            .chain(self.child_qdiscs.values())
            .cloned()
            .collect())
    }
    fn classes(&mut self, _: u32, major: u16) -> Result<Vec<ClassInfo>, KernelError> {
        Ok(self
            .classes
            .values()
            .filter(|c| major == 0 || c.classid.major() == major)
            .map(|c| ClassInfo {
                classid: c.classid.to_string(),
                handle: c.classid.0,
                parent: c.parent.0,
                rate_kbps: c.rate.0,
                ceil_kbps: c.ceil.0,
                prio: c.prio,
                ..ClassInfo::default()
            })
            .collect())
    }
    fn tc(&mut self, ops: &[TcOp]) -> Vec<Result<(), KernelError>> {
        self.tc_messages += ops.len();
        ops.iter().map(|op| self.apply_op(op)).collect()
    }
    fn ensure_ifb(&mut self, name: &str) -> Result<u32, String> {
        let next = self.interfaces.values().max().copied().unwrap_or(0) + 1;
        Ok(*self.interfaces.entry(name.to_owned()).or_insert(next))
    }
    fn delete_link(&mut self, name: &str) -> Result<(), String> {
        self.interfaces.remove(name);
        Ok(())
    }
    fn read_table(&mut self, layout: &Layout) -> Result<Option<TableState>, String> {
        Ok(self.table.as_ref().map(|t| t.state(&layout.hook())))
    }
    fn nft(&mut self, batch: &Batch) -> Result<(), String> {
        self.nft_transactions += 1;
        if let Some(e) = self.fail_next_nft.take() {
            return Err(e);
        }
        let mut n = FakeNft {
            table: self.table.clone(),
        };
        n.apply(batch)?;
        self.table = n.table;
        Ok(())
    }
}
