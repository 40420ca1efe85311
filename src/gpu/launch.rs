//! Grid and block sizes, as pure functions of the shape, dtype, SM count and the kernel's
//! residency (its blocks per SM). Call sites never compute a block size; every rule here is
//! unit-tested on the CPU.

use crate::dtype::DType;
use crate::shape::Geometry;

/// Threads per block of every kernel (the CUDA side is compiled with `__launch_bounds__(256)`).
pub const BLOCK_THREADS: u32 = 256;
/// Warps per block.
const WARPS_PER_BLOCK: u64 = (BLOCK_THREADS / 32) as u64;
/// Blocks per SM the flat launches (fold, conv tools) aim for: 8 x 256 threads fill an SM of
/// H100 (2048 threads). The batch-norm passes size their grids from the kernel's own occupancy
/// instead: [`Residency`].
pub const BLOCKS_PER_SM: u32 = 8;
/// Warp units each warp should get before another split pays for its partial and merge.
const MIN_UNITS_PER_WARP: u64 = 4;
/// Most blocks one channel's reduction is split over (the last block merges this many partials).
pub const MAX_SPLITS: u32 = 1024;
/// CUDA's limit on `gridDim.y` and `gridDim.z`.
const MAX_GRID_Y: u64 = 65_535;

/// Elements per 16-byte vector of `dtype`: the VEC of the kernels.
pub const fn vector_width(dtype: DType) -> u64 {
    16 / dtype.size_of() as u64
}

/// How a kernel walks the tensor: see `kernels/common.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traversal {
    /// Channels-first with a spatial extent: warp units over (plane, chunk) of contiguous values.
    Planar,
    /// Channels-last and `(N, C)`: thread columns own `VEC` channels, rows are strided.
    Rows,
}

impl Traversal {
    /// The traversal for a geometry: rows when each channel's values are strided by `C`.
    pub fn of(g: &Geometry) -> Self {
        if g.inner > 1 {
            Traversal::Planar
        } else {
            Traversal::Rows
        }
    }
}

/// Grid, block and (for reductions) the number of blocks each channel is split over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// `gridDim`.
    pub grid: (u32, u32, u32),
    /// `blockDim`.
    pub block: (u32, u32, u32),
    /// Blocks per channel (group) of a split reduction; 1 for elementwise kernels.
    pub splits: u32,
}

impl Launch {
    pub(crate) fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: 0,
        }
    }
}

/// Block shape `(bx, by)` of the rows traversal: `bx` thread columns of `VEC` channels each
/// (at most a warp), `by = 256 / bx` rows at a time.
pub fn rows_block(channels: u64, vec: u64) -> (u32, u32) {
    let columns = channels.div_ceil(vec);
    let bx = columns.next_power_of_two().min(32) as u32;
    (bx, BLOCK_THREADS / bx)
}

/// Warp units of one plane: chunks of 32 lanes x VEC values.
fn units_per_plane(inner: u64, vec: u64) -> u64 {
    inner.div_ceil(32 * vec)
}

/// How many blocks of one kernel the device runs at once: `sm_count * blocks_per_sm` is one full
/// wave. `blocks_per_sm` is the driver's occupancy for that kernel (its registers and shared
/// memory, [`BLOCK_THREADS`] threads), asked once when the kernels are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Residency {
    /// Streaming multiprocessors of the device.
    pub sm_count: u32,
    /// Blocks of the kernel resident on one SM (at least 1).
    pub blocks_per_sm: u32,
}

impl Residency {
    /// Blocks of one full wave.
    pub fn wave(&self) -> u64 {
        u64::from(self.sm_count.max(1)) * u64::from(self.blocks_per_sm.max(1))
    }
}

/// Blocks per channel group so that the grid fills one wave (`groups * splits <= wave` while
/// there are fewer groups than resident blocks: no second, partly idle wave), but no more than
/// keep each warp busy with a few units, and few enough that the kernels' 32-bit workspace
/// offsets (`C * splits * 3` floats) cannot overflow.
fn splits_for(groups: u64, units_per_group: u64, channels: u64, resident: Residency) -> u32 {
    let wanted = resident.wave() / groups.max(1);
    let useful = units_per_group
        .div_ceil(WARPS_PER_BLOCK * MIN_UNITS_PER_WARP)
        .max(1);
    let addressable = u32::MAX as u64 / (PARTIAL_FLOATS * channels.max(1));
    wanted
        .min(useful)
        .min(addressable)
        .clamp(1, MAX_SPLITS as u64) as u32
}

/// Floats per channel and split of the largest partial (Welford: count, mean, m2).
const PARTIAL_FLOATS: u64 = 3;

/// Partials one thread row merges in a level of the rows merge (`kMergeRun` of
/// kernels/common.cuh): a level covers `MERGE_RUN * by` splits.
pub const MERGE_RUN: u64 = 8;

/// Merge groups of a rows reduction: 1 (one level) or `ceil(splits / (MERGE_RUN * by))` (two).
fn merge_groups(l: &Launch) -> u64 {
    let run = MERGE_RUN * u64::from(l.block.1);
    u64::from(l.splits).div_ceil(run)
}

/// The longest chain of dependent partial loads one thread of a split reduction runs in its
/// merge (the serial tail after the last block of a group arrives; the shuffle and shared
/// memory trees after it are not counted). 0 for one split, which merges nothing.
///
/// Planar: the last block's 256 threads take splits `t, t + 256, ...`. Rows: a thread row
/// takes splits `ty, ty + by, ...`; past `MERGE_RUN * by` splits the merge takes two levels,
/// `MERGE_RUN` loads per group and then `ceil(groups / by)` for the groups.
pub fn merge_depth(traversal: Traversal, l: &Launch) -> u64 {
    let splits = u64::from(l.splits);
    if splits <= 1 {
        return 0;
    }
    match traversal {
        Traversal::Planar => splits.div_ceil(u64::from(BLOCK_THREADS)),
        Traversal::Rows => {
            let by = u64::from(l.block.1);
            match merge_groups(l) {
                1 => splits.div_ceil(by),
                groups => MERGE_RUN + groups.div_ceil(by),
            }
        }
    }
}

/// Semaphores a split reduction uses: one per channel (planar), or per channel tile (rows) plus
/// one per tile and merge group when the rows merge takes two levels. Never more than the
/// channels (unit test), which is what the workspace holds.
pub fn semaphores(g: &Geometry, l: &Launch) -> u64 {
    match Traversal::of(g) {
        Traversal::Planar => g.channels as u64,
        Traversal::Rows => match merge_groups(l) {
            1 => u64::from(l.grid.0),
            groups => u64::from(l.grid.0) * (1 + groups),
        },
    }
}

/// A split per-channel reduction (statistics, backward sums).
///
/// Planar: grid `(splits, min(C, 65535))`, block rows looping over the channels `y, y + 65535,
/// ...` (CUDA caps `gridDim.y`). Rows: grid `(channel tiles, splits)` with [`rows_block`].
/// The grid is one wave of the kernel (`resident`) where the shape has the work for it.
pub fn reduction(g: &Geometry, dtype: DType, resident: Residency) -> Launch {
    let vec = vector_width(dtype);
    let channels = g.channels as u64;
    match Traversal::of(g) {
        Traversal::Planar => {
            let units = g.outer as u64 * units_per_plane(g.inner as u64, vec);
            let splits = splits_for(channels, units, channels, resident);
            Launch {
                grid: (splits, channels.min(MAX_GRID_Y) as u32, 1),
                block: (BLOCK_THREADS, 1, 1),
                splits,
            }
        }
        Traversal::Rows => {
            let (bx, by) = rows_block(channels, vec);
            let tiles = channels.div_ceil(bx as u64 * vec);
            // A row of a tile is one "unit" for one warp row of the block.
            let row_units = (g.outer as u64).div_ceil(by as u64) * WARPS_PER_BLOCK;
            let splits = splits_for(tiles, row_units, channels, resident).min(MAX_GRID_Y as u32);
            Launch {
                grid: (tiles as u32, splits, 1),
                block: (bx, by, 1),
                splits,
            }
        }
    }
}

/// An elementwise pass (normalize, dx): at most one wave of the kernel's resident blocks, whose
/// grid-stride loops then give every warp the same number of units, give or take one (a second,
/// partial wave would leave SMs idle at the tail).
///
/// Planar: a 1-D grid whose warps split the flat tensor's warp units (32 lanes x `VEC`
/// consecutive values, spanning planes: `kernels/common.cuh`, walk_flat). Rows: grid
/// `(channel tiles, row blocks)` with [`rows_block`].
pub fn elementwise(g: &Geometry, dtype: DType, resident: Residency) -> Launch {
    let vec = vector_width(dtype);
    let target = resident.wave();
    match Traversal::of(g) {
        Traversal::Planar => {
            let numel = (g.outer * g.channels * g.inner) as u64;
            let units = numel.div_ceil(32 * vec);
            let blocks = units.div_ceil(WARPS_PER_BLOCK).clamp(1, target);
            Launch {
                grid: (blocks as u32, 1, 1),
                block: (BLOCK_THREADS, 1, 1),
                splits: 1,
            }
        }
        Traversal::Rows => {
            let (bx, by) = rows_block(g.channels as u64, vec);
            let tiles = (g.channels as u64).div_ceil(bx as u64 * vec);
            let row_blocks = (g.outer as u64)
                .div_ceil(by as u64)
                .clamp(1, target.div_ceil(tiles).clamp(1, MAX_GRID_Y));
            Launch {
                grid: (tiles as u32, row_blocks as u32, 1),
                block: (bx, by, 1),
                splits: 1,
            }
        }
    }
}

/// Dynamic shared memory of one slot row of the single-pass forward: each of a block's 256
/// threads keeps a 16-byte vector (one row of its `VEC` channels) per slot.
pub const ONCHIP_SLOT_BYTES: u64 = 16 * BLOCK_THREADS as u64;

/// Most blocks per SM the device holds (sm_90, and the occupancy calculator's limit).
const MAX_BLOCKS_PER_SM: u32 = 32;

/// The single-pass forward's launch (`kernels/bn_onchip.cu`): the grid of the rows reduction
/// ([`rows_block`], `(channel tiles, splits)`), every block of it resident at once, and the
/// dynamic shared memory each block keeps its rows in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnChip {
    /// Grid, block and splits (row blocks per channel tile).
    pub launch: Launch,
    /// Dynamic shared memory per block: `ceil(rows / (splits * by))` slot rows.
    pub shared_bytes: u32,
}

/// The single-pass forward of a rows tensor (channels-last, `(N, C)`), where it fits on chip:
/// the largest grid of `(tiles, splits)` blocks that are all resident at once, each holding its
/// rows in dynamic shared memory, or `None` (planar tensors, or a tensor larger than the SMs'
/// shared memory together).
///
/// `max_shared`: the dynamic shared memory a block may ask for; `blocks_per_sm(bytes)`: how many
/// blocks an SM holds with `bytes` each (the driver's occupancy). Tried from the most blocks per
/// SM down: the first that holds the tensor gives the most blocks. Splits stay within the rows
/// reduction's limits (at most one per `by` rows, [`MAX_SPLITS`], 32-bit workspace offsets).
pub fn on_chip(
    g: &Geometry,
    dtype: DType,
    sm_count: u32,
    max_shared: u64,
    mut blocks_per_sm: impl FnMut(u64) -> u32,
) -> Option<OnChip> {
    if Traversal::of(g) != Traversal::Rows {
        return None;
    }
    let vec = vector_width(dtype);
    let (channels, rows) = (g.channels as u64, g.outer as u64);
    let (bx, by) = rows_block(channels, vec);
    let tiles = channels.div_ceil(u64::from(bx) * vec);
    let useful = rows
        .div_ceil(u64::from(by))
        .min(MAX_SPLITS as u64)
        .min(MAX_GRID_Y)
        .min(u32::MAX as u64 / (PARTIAL_FLOATS * channels.max(1)));
    for per_sm in (1..=MAX_BLOCKS_PER_SM).rev() {
        let splits = (u64::from(sm_count) * u64::from(per_sm) / tiles).min(useful);
        if splits == 0 {
            continue;
        }
        let shared = rows.div_ceil(splits * u64::from(by)) * ONCHIP_SLOT_BYTES;
        if shared > max_shared {
            continue;
        }
        let resident = u64::from(sm_count) * u64::from(blocks_per_sm(shared));
        if tiles * splits <= resident {
            return Some(OnChip {
                launch: Launch {
                    grid: (tiles as u32, splits as u32, 1),
                    block: (bx, by, 1),
                    splits: splits as u32,
                },
                shared_bytes: shared as u32,
            });
        }
    }
    None
}

/// A 1-D grid-stride launch over `n` independent elements (the fold).
pub fn flat(n: u64, sm_count: u32) -> Launch {
    let blocks = n
        .div_ceil(BLOCK_THREADS as u64)
        .clamp(1, (sm_count * BLOCKS_PER_SM) as u64);
    Launch {
        grid: (blocks as u32, 1, 1),
        block: (BLOCK_THREADS, 1, 1),
        splits: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::{Layout, TensorDesc};

    const H100_SMS: u32 = 132;
    /// An H100/H200 running 4 blocks of a reduction per SM (ptxas: 40-64 registers).
    const H100: Residency = Residency {
        sm_count: H100_SMS,
        blocks_per_sm: 4,
    };

    fn geometry(dims: &[usize], layout: Layout) -> Geometry {
        TensorDesc::new(dims, layout).unwrap().geometry()
    }

    fn shapes() -> Vec<Geometry> {
        let mut all = Vec::new();
        for dims in [
            &[1usize, 1, 1][..],
            &[2, 1],
            &[4096, 1024],
            &[32, 2048, 7, 7],
            &[256, 2, 112, 112],
            &[1, 4, 64, 64, 64],
            &[7, 17, 33],
            &[1, 65_535, 3],
            &[2, 70_000, 3],
            &[3, 200_000],
            &[32, 64, 1024, 1100],
        ] {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                all.push(geometry(dims, layout));
            }
        }
        all
    }

    fn check_block(l: &Launch) {
        let threads = l.block.0 * l.block.1 * l.block.2;
        assert_eq!(threads, BLOCK_THREADS, "{l:?}");
        assert!(l.block.0.is_power_of_two() && l.block.0 <= 256);
        assert!(l.grid.0 >= 1 && l.grid.1 >= 1 && l.grid.1 as u64 <= MAX_GRID_Y);
    }

    #[test]
    fn reductions_cover_every_channel_and_fill_the_gpu() {
        for g in shapes() {
            for dtype in DType::ALL {
                let l = reduction(&g, dtype, H100);
                check_block(&l);
                assert!((1..=MAX_SPLITS).contains(&l.splits));
                assert!((g.channels as u64) * l.splits as u64 * PARTIAL_FLOATS <= u32::MAX as u64);
                match Traversal::of(&g) {
                    Traversal::Planar => {
                        assert_eq!(l.grid.1 as u64, (g.channels as u64).min(MAX_GRID_Y));
                        assert_eq!(l.grid.0, l.splits);
                    }
                    Traversal::Rows => {
                        let per_block = l.block.0 as u64 * vector_width(dtype);
                        assert!(l.grid.0 as u64 * per_block >= g.channels as u64);
                        assert!((l.grid.0 as u64 - 1) * per_block < g.channels as u64);
                        assert_eq!(l.grid.1, l.splits);
                    }
                }
                // Few channels with many values: the split must keep every SM busy.
                if g.channels <= 4 && g.per_channel() >= 1 << 20 {
                    let blocks = l.grid.0 * l.grid.1;
                    assert!(blocks >= H100_SMS, "{g:?} {dtype}: only {blocks} blocks");
                }
            }
        }
    }

    /// Shapes for the merge sweeps: every rows block width, a channel tile that is split
    /// unevenly, few and many rows, and the planar shapes.
    fn sweep_shapes() -> Vec<Geometry> {
        let mut all = shapes();
        for c in [
            1usize, 2, 3, 4, 5, 8, 9, 16, 17, 24, 32, 33, 64, 65, 100, 128, 129, 255, 256,
        ] {
            for c in [c, c + 256, 4 * c + 1000] {
                for n in [1usize, 7, 1000, 100_000, 3 << 20] {
                    all.push(geometry(&[n, c], Layout::ChannelsFirst));
                }
            }
        }
        for dims in [
            [256usize, 64, 112, 112],
            [32, 256, 56, 56],
            [32, 2, 512, 512],
        ] {
            all.push(geometry(&dims, Layout::ChannelsFirst));
            all.push(geometry(&dims, Layout::ChannelsLast));
        }
        all
    }

    /// Item 1 of issue 19: no thread of a split reduction merges more than 32 partials one
    /// after another, for any shape, dtype, SM count or occupancy; and the semaphores it uses
    /// fit in the workspace's one per channel.
    #[test]
    fn merge_depth_is_bounded_and_semaphores_fit() {
        let shapes = sweep_shapes();
        for sm_count in (1..=140).chain([264, 1000]) {
            for blocks_per_sm in [1, 2, 3, 4, 5, 6, 8, 16, 32] {
                let resident = Residency {
                    sm_count,
                    blocks_per_sm,
                };
                for g in &shapes {
                    for dtype in DType::ALL {
                        let l = reduction(g, dtype, resident);
                        let depth = merge_depth(Traversal::of(g), &l);
                        assert!(
                            depth <= 32,
                            "{g:?} {dtype} {resident:?}: {l:?} depth {depth}"
                        );
                        let sems = semaphores(g, &l);
                        assert!(
                            sems <= g.channels as u64,
                            "{g:?} {dtype} {resident:?}: {sems}"
                        );
                    }
                }
            }
        }
    }

    /// Item 3: a reduction with work enough fills one wave of its kernel and no more (no
    /// second, partly idle wave), whatever the occupancy.
    #[test]
    fn reductions_launch_one_wave() {
        for blocks_per_sm in 1..=8 {
            let resident = Residency {
                sm_count: H100_SMS,
                blocks_per_sm,
            };
            for g in sweep_shapes() {
                for dtype in DType::ALL {
                    let l = reduction(&g, dtype, resident);
                    let blocks = u64::from(l.grid.0) * u64::from(l.grid.1);
                    let groups = blocks / u64::from(l.splits);
                    if groups <= resident.wave() {
                        assert!(blocks <= resident.wave(), "{g:?} {dtype}: {l:?}");
                    }
                    if groups == 1 && g.per_channel() >= 1 << 24 {
                        assert!(2 * blocks >= resident.wave(), "{g:?} {dtype}: {l:?}");
                    }
                }
            }
        }
    }

    /// The grids bench/PLAN.md predicts from (132 SMs; blocks per SM from ptxas' registers for
    /// sm_90: 40 registers 6, 48 registers 5, 56-64 registers 4), worked out by hand there.
    #[test]
    fn plan_shapes() {
        type Case = (&'static [usize], Layout, DType, u32, u32, u64);
        let cases: [Case; 9] = [
            // 256 x 49 units of 256 halves per channel: 792 / 64 = 12 splits.
            (
                &[256, 64, 112, 112],
                Layout::ChannelsFirst,
                DType::F16,
                6,
                12,
                1,
            ),
            // 32 x 2048 units of 128 floats per channel (useful: 2048): 792 / 2 = 396 splits.
            (
                &[32, 2, 512, 512],
                Layout::ChannelsFirst,
                DType::F32,
                6,
                396,
                2,
            ),
            // C = 64 halves: bx 8, by 32, one tile. Stats (5 per SM): 660 splits, run 256,
            // 3 groups; reduce (4 per SM): 528 splits, 3 groups.
            (
                &[256, 64, 56, 56],
                Layout::ChannelsLast,
                DType::F16,
                5,
                660,
                8 + 1,
            ),
            (
                &[256, 64, 56, 56],
                Layout::ChannelsLast,
                DType::F16,
                4,
                528,
                8 + 1,
            ),
            // C = 256 halves: bx 32, by 8, one tile; run 64: 11 and 9 groups.
            (
                &[32, 256, 56, 56],
                Layout::ChannelsLast,
                DType::F16,
                5,
                660,
                8 + 2,
            ),
            (
                &[32, 256, 56, 56],
                Layout::ChannelsLast,
                DType::F16,
                4,
                528,
                8 + 2,
            ),
            // C = 2048 >= a wave of channels: one split each, nothing to merge.
            (
                &[64, 2048, 7, 7],
                Layout::ChannelsFirst,
                DType::F32,
                6,
                1,
                0,
            ),
            // C = 32 floats: bx 8, by 32, one tile, useful 782 splits; run 256: 3 and 4 groups.
            (
                &[100_000, 32],
                Layout::ChannelsFirst,
                DType::F32,
                5,
                660,
                8 + 1,
            ),
            (
                &[100_000, 32],
                Layout::ChannelsFirst,
                DType::F32,
                6,
                782,
                8 + 1,
            ),
        ];
        for (dims, layout, dtype, blocks_per_sm, splits, depth) in cases {
            let g = geometry(dims, layout);
            let resident = Residency {
                sm_count: H100_SMS,
                blocks_per_sm,
            };
            let l = reduction(&g, dtype, resident);
            assert_eq!(l.splits, splits, "{dims:?} {layout:?} {dtype}: {l:?}");
            assert_eq!(merge_depth(Traversal::of(&g), &l), depth, "{dims:?}: {l:?}");
        }
    }

    #[test]
    fn elementwise_launches_are_valid() {
        for g in shapes() {
            for dtype in DType::ALL {
                let l = elementwise(&g, dtype, H100);
                check_block(&l);
                if Traversal::of(&g) == Traversal::Rows {
                    let per_block = l.block.0 as u64 * vector_width(dtype);
                    assert!(l.grid.0 as u64 * per_block >= g.channels as u64);
                }
            }
        }
    }

    /// Channels-first elementwise grids count the flat tensor's units, not planes x chunks: a
    /// 7x7 layer's warps get full 512-byte units instead of one 98-byte plane each.
    #[test]
    fn planar_elementwise_grids_count_flat_units() {
        let small = geometry(&[2, 64, 7, 7], Layout::ChannelsFirst);
        // 6272 f16 values: 24.5 units of 256, one block of 8 warps covers 8 of them.
        assert_eq!(elementwise(&small, DType::F16, H100).grid, (4, 1, 1));
        assert_eq!(elementwise(&small, DType::F32, H100).grid, (7, 1, 1));
        // A large layer: one wave of the kernel's resident blocks.
        let large = geometry(&[64, 2048, 7, 7], Layout::ChannelsFirst);
        let wave = H100.wave() as u32;
        assert_eq!(elementwise(&large, DType::F32, H100).grid, (wave, 1, 1));
        let rows = geometry(&[256, 64, 56, 56], Layout::ChannelsLast);
        let l = elementwise(&rows, DType::F16, H100);
        assert!(l.grid.0 * l.grid.1 <= wave, "{l:?}");
    }

    /// An H100/H200's occupancy with dynamic shared memory: 228 KB per SM, 1 KB reserved and
    /// 20 KB static per block, at most 8 blocks of 256 threads (64 registers).
    fn h100_blocks_per_sm(shared: u64) -> u32 {
        (233_472 / (shared + 21 * 1024)).min(8) as u32
    }
    const H100_MAX_SHARED: u64 = 227 * 1024 - 24 * 1024;

    /// The single pass takes rows tensors that fit in the SMs' shared memory, with every block
    /// resident, every row in some block's slots, and the reduction's limits kept.
    #[test]
    fn on_chip_grids_fit_and_cover_the_rows() {
        for g in sweep_shapes() {
            for dtype in DType::ALL {
                for sm_count in [1, 7, 132] {
                    let plan = on_chip(&g, dtype, sm_count, H100_MAX_SHARED, h100_blocks_per_sm);
                    if Traversal::of(&g) == Traversal::Planar {
                        assert_eq!(plan, None);
                        continue;
                    }
                    let Some(p) = plan else {
                        // A tensor is refused only when its rows, padded to whole 16-byte
                        // vectors of the tiles, take more than half the SMs' shared memory
                        // (the rest is the granularity of slots and blocks per SM), or when
                        // its channel tiles alone (one block each) are more than the SMs hold.
                        let (bx, by) = rows_block(g.channels as u64, vector_width(dtype));
                        let tiles =
                            (g.channels as u64).div_ceil(u64::from(bx) * vector_width(dtype));
                        let padded = g.outer as u64 * tiles * u64::from(bx) * 16;
                        let one_split =
                            (g.outer as u64).div_ceil(u64::from(by)) * ONCHIP_SLOT_BYTES;
                        let resident =
                            u64::from(sm_count) * u64::from(h100_blocks_per_sm(one_split));
                        assert!(
                            2 * padded > u64::from(sm_count) * H100_MAX_SHARED || tiles > resident,
                            "{g:?} {dtype} on {sm_count} SMs"
                        );
                        continue;
                    };
                    let l = p.launch;
                    check_block(&l);
                    assert_eq!(l.grid.1, l.splits);
                    let blocks = u64::from(l.grid.0) * u64::from(l.grid.1);
                    let shared = u64::from(p.shared_bytes);
                    assert!(shared <= H100_MAX_SHARED && shared % ONCHIP_SLOT_BYTES == 0);
                    assert!(blocks <= u64::from(sm_count) * u64::from(h100_blocks_per_sm(shared)));
                    let slots = shared / ONCHIP_SLOT_BYTES;
                    let band = u64::from(l.splits) * u64::from(l.block.1);
                    assert!(slots * band >= g.outer as u64, "{g:?} {dtype}: {p:?}");
                    assert!(merge_depth(Traversal::Rows, &l) <= 32);
                    let per_block = u64::from(l.block.0) * vector_width(dtype);
                    assert!(u64::from(l.grid.0) * per_block >= g.channels as u64);
                }
            }
        }
    }

    /// PLAN.md's single-pass shapes on an H200 (132 SMs).
    #[test]
    fn on_chip_plan_shapes() {
        // (N, C) = (100000, 32) f32: 12.8 MB. bx 8, by 32, one tile. 7 or more blocks per SM
        // ask for 4 slots (16 KB), with which an SM holds 6: 792 splits of 4 slots (128 rows).
        let g = geometry(&[100_000, 32], Layout::ChannelsFirst);
        let p = on_chip(&g, DType::F32, 132, H100_MAX_SHARED, h100_blocks_per_sm).unwrap();
        assert_eq!(p.launch.grid, (1, 792, 1));
        assert_eq!(p.shared_bytes, 4 * 4096);
        // NHWC f16 32x256x56x56 (51 MB) does not fit in 132 x 203 KB.
        let g = geometry(&[32, 256, 56, 56], Layout::ChannelsLast);
        assert_eq!(
            on_chip(&g, DType::F16, 132, H100_MAX_SHARED, h100_blocks_per_sm),
            None
        );
        // NHWC f16 8x256x56x56 (12.8 MB, 25088 rows): one tile of 256 channels (bx 32, by 8),
        // the same way 792 splits of 4 slots (32 rows).
        let g = geometry(&[8, 256, 56, 56], Layout::ChannelsLast);
        let p = on_chip(&g, DType::F16, 132, H100_MAX_SHARED, h100_blocks_per_sm).unwrap();
        assert_eq!(p.launch.grid, (1, 792, 1));
        assert_eq!(p.shared_bytes, 4 * 4096);
    }

    #[test]
    fn rows_block_shapes() {
        assert_eq!(rows_block(2, 4), (1, 256));
        assert_eq!(rows_block(16, 8), (2, 128));
        assert_eq!(rows_block(17, 4), (8, 32));
        assert_eq!(rows_block(1024, 8), (32, 8));
    }

    #[test]
    fn traversal_follows_layout() {
        assert_eq!(
            Traversal::of(&geometry(&[8, 3, 5], Layout::ChannelsFirst)),
            Traversal::Planar
        );
        assert_eq!(
            Traversal::of(&geometry(&[8, 3, 5], Layout::ChannelsLast)),
            Traversal::Rows
        );
        assert_eq!(
            Traversal::of(&geometry(&[8, 3], Layout::ChannelsFirst)),
            Traversal::Rows
        );
    }

    /// The normalize kernels write a rows mask word from the lanes of one block: they need
    /// `bx * VEC >= 32` (a word's 32 channels inside one block) or a single channel tile
    /// (kernels/epilogue.cuh, store_mask). The elementwise launch must keep it for every C.
    #[test]
    fn rows_launches_keep_mask_words_inside_a_block() {
        for c in (1..=300).chain([511, 512, 513, 1000, 1001, 4096, 65_537]) {
            for dtype in DType::ALL {
                let desc = TensorDesc::new(&[3, c], Layout::ChannelsLast).unwrap();
                let g = desc.geometry();
                assert_eq!(Traversal::of(&g), Traversal::Rows);
                let l = elementwise(&g, dtype, H100);
                let vec = vector_width(dtype);
                let (bx, tiles) = (l.block.0 as u64, l.grid.0);
                assert!(bx * vec >= 32 || tiles == 1, "C = {c} {dtype}: {l:?}");
            }
        }
    }
}
