//! Grid and block sizes, as pure functions of the shape, dtype, SM count and the kernel's
//! residency (its blocks per SM). Call sites never compute a block size; every rule here is
//! unit-tested on the CPU.

use super::kernels::IndexWidth;
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
    /// Channels-last and `(N, C)`: thread columns own `VEC` channels, rows are strided (the
    /// elementwise passes: super-rows of [`rows_map_width`] values).
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

/// Block shape `(bx, by)` of the rows traversal over rows of `width` values (the channels of a
/// real row, or a super-row of [`rows_map_width`]): `bx` thread columns of `VEC` values each (at
/// most a warp), `by = 256 / bx` rows at a time.
pub fn rows_block(width: u64, vec: u64) -> (u32, u32) {
    let columns = width.div_ceil(vec);
    let bx = columns.next_power_of_two().min(32) as u32;
    (bx, BLOCK_THREADS / bx)
}

/// Values per super-row of the rows elementwise passes (`map_rows` in kernels/common.cuh, which
/// computes the same): `lcm(C, 32 * VEC)`, so that column `j` holds channel `j % C` in every
/// super-row (a thread's coefficients stay in registers), a super-row is whole mask words and
/// whole 32-lane block rows of `VEC` values (no idle lanes); or `numel` rounded up to 32 when
/// that is smaller (one partial super-row). A multiple of 32, hence of `VEC`: the 16-byte path
/// needs only `numel % VEC == 0`. 0 for an empty tensor (nothing is launched).
pub fn rows_map_width(channels: u64, numel: u64, vec: u64) -> u64 {
    let unit = (32 * vec).trailing_zeros(); // 32 * VEC is a power of two
    let lcm = channels << (unit - channels.trailing_zeros().min(unit));
    lcm.min(numel.next_multiple_of(32))
}

/// Warp units of one channel of a planar (channels-first) reduction, as the kernels count them
/// (`kernels/common.cuh`, planar_span): a plane of more than half a unit (`16 * VEC` values) is
/// cut into chunks of 32 lanes x `VEC` values; smaller planes are packed, `32 * VEC / inner`
/// whole planes per unit, when the kernel takes 32-bit indices (its `packs`).
fn planar_units(g: &Geometry, dtype: DType) -> u64 {
    let (outer, inner) = (g.outer as u64, (g.inner as u64).max(1));
    let unit = 32 * vector_width(dtype);
    let packs = IndexWidth::for_numel(g.outer * g.channels * g.inner) == IndexWidth::I32;
    if packs && inner <= unit / 2 {
        outer.div_ceil(unit / inner)
    } else {
        outer * inner.div_ceil(unit)
    }
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
            let units = planar_units(g, dtype);
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
/// `(column tiles, row blocks)` over super-rows of [`rows_map_width`] values, with
/// [`rows_block`] of that width (so `bx * VEC >= 32`: the lanes sharing a mask word are in one
/// block row).
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
            let numel = (g.outer * g.channels) as u64;
            let width = rows_map_width(g.channels as u64, numel, vec).max(1);
            let (bx, by) = rows_block(width, vec);
            let tiles = width.div_ceil(bx as u64 * vec);
            let super_rows = numel.div_ceil(width);
            let row_blocks = super_rows
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

    /// Item 2: small planes are packed into warp units (several planes of one channel per unit)
    /// when the tensor takes 32-bit indices, so the split counts follow the kernels' units.
    #[test]
    fn small_planes_pack_into_warp_units() {
        let units =
            |dims: &[usize], dtype| planar_units(&geometry(dims, Layout::ChannelsFirst), dtype);
        // 7x7: 256 / 49 = 5 planes per f16 unit, 128 / 49 = 2 per f32 unit.
        assert_eq!(units(&[64, 2048, 7, 7], DType::F16), 13);
        assert_eq!(units(&[64, 2048, 7, 7], DType::BF16), 13);
        assert_eq!(units(&[64, 2048, 7, 7], DType::F32), 32);
        // 3x3: 14 planes per f32 unit, 28 per f16 unit; a partial last unit.
        assert_eq!(units(&[64, 8, 3, 3], DType::F32), 5);
        assert_eq!(units(&[64, 8, 3, 3], DType::F16), 3);
        // At half a unit (64 floats, 128 halves) two planes share a unit; past it, chunks.
        assert_eq!(units(&[7, 3, 64], DType::F32), 4);
        assert_eq!(units(&[7, 3, 65], DType::F32), 7);
        assert_eq!(units(&[7, 3, 128], DType::F16), 4);
        assert_eq!(units(&[7, 3, 129], DType::F16), 7);
        // 14x14 is more than half a unit in every dtype: 2 chunks per f32 plane, 1 per f16.
        assert_eq!(units(&[64, 256, 14, 14], DType::F32), 128);
        assert_eq!(units(&[64, 256, 14, 14], DType::F16), 64);
        // 64-bit indices (2^31 values or more): the kernels keep chunked units.
        assert_eq!(units(&[4096, 10_700, 7, 7], DType::F16), 4096);
        assert_eq!(units(&[4096, 10_600, 7, 7], DType::F16), 820);
        // A 7x7 f32 layer with few channels gets fewer, fuller splits.
        let l = reduction(
            &geometry(&[256, 4, 7, 7], Layout::ChannelsFirst),
            DType::F32,
            H100,
        );
        assert_eq!(l.splits, 4, "{l:?}"); // 128 units / (8 warps x 4 units)
    }

    #[test]
    fn elementwise_launches_are_valid() {
        for g in shapes() {
            for dtype in DType::ALL {
                let l = elementwise(&g, dtype, H100);
                check_block(&l);
                if Traversal::of(&g) == Traversal::Rows {
                    let numel = (g.outer * g.channels) as u64;
                    let width = rows_map_width(g.channels as u64, numel, vector_width(dtype));
                    let per_block = l.block.0 as u64 * vector_width(dtype);
                    // The tiles cover a super-row and no tile is idle.
                    assert!(l.grid.0 as u64 * per_block >= width, "{g:?} {dtype}: {l:?}");
                    assert!(
                        (l.grid.0 as u64 - 1) * per_block < width,
                        "{g:?} {dtype}: {l:?}"
                    );
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

    /// Super-rows of the rows maps: lcm(C, 32 * VEC) values, or the tensor rounded up to a word
    /// when it is shorter (values worked out by hand).
    #[test]
    fn rows_map_widths() {
        let big = 1 << 40;
        // f32 (VEC 4: lcm with 128), f16 (VEC 8: lcm with 256).
        for (c, f32_width, f16_width) in [
            (1u64, 128u64, 256u64),
            (3, 384, 768),
            (5, 640, 1280),
            (7, 896, 1792),
            (12, 384, 768), // 12 = 4 * 3
            (24, 384, 768), // 24 = 8 * 3
            (32, 128, 256),
            (64, 128, 256),
            (100, 3200, 6400), // 100 = 4 * 25
            (128, 128, 256),
            (256, 256, 256),
            (257, 257 * 128, 257 * 256),
            (1024, 1024, 1024),
            (1000, 16_000, 32_000), // 1000 = 8 * 125
        ] {
            assert_eq!(rows_map_width(c, big, 4), f32_width, "C = {c}");
            assert_eq!(rows_map_width(c, big, 8), f16_width, "C = {c}");
            for width in [f32_width, f16_width] {
                assert_eq!(width % c, 0);
                assert_eq!(width % 32, 0);
            }
        }
        // One partial super-row: numel rounded up to 32.
        assert_eq!(rows_map_width(257, 3 * 257, 4), 800); // 771 values
        assert_eq!(rows_map_width(3, 6, 8), 32);
        assert_eq!(rows_map_width(100, 6400, 8), 6400); // exactly one super-row
        assert_eq!(rows_map_width(100, 6401, 8), 6400);
        assert_eq!(rows_map_width(100, 6399, 8), 6400); // 6399 rounds up to 6400
        assert_eq!(rows_map_width(3, 0, 4), 0);
    }

    /// The rows elementwise grids over super-rows, by hand: bench/PLAN.md's C = 3 and C = 100
    /// shapes, a partial super-row, and a tensor shorter than a super-row.
    #[test]
    fn rows_elementwise_grids_walk_super_rows() {
        // One wave of H100: 132 x 4 = 528 blocks.
        // NHWC f16 256x3x224x224: P = 768, 3 tiles of 32 x 8; 38,535,168 / 768 = 50,176
        // super-rows in 6272 row blocks of 8, capped at ceil(528 / 3) = 176.
        let c3 = geometry(&[256, 3, 224, 224], Layout::ChannelsLast);
        let l = elementwise(&c3, DType::F16, H100);
        assert_eq!((l.grid, l.block), ((3, 176, 1), (32, 8, 1)));
        // f32: P = 384, 3 tiles of 32 x 4.
        let l = elementwise(&c3, DType::F32, H100);
        assert_eq!((l.grid, l.block), ((3, 176, 1), (32, 8, 1)));
        // NHWC f16 64x100x56x56: P = 6400, 25 tiles; 20,070,400 / 6400 = 3136 super-rows,
        // 392 row blocks, capped at ceil(528 / 25) = 22.
        let c100 = geometry(&[64, 100, 56, 56], Layout::ChannelsLast);
        let l = elementwise(&c100, DType::F16, H100);
        assert_eq!((l.grid, l.block), ((25, 22, 1), (32, 8, 1)));
        // (N, C) = (10, 257) f32: 2570 values, shorter than P = 32,896: one super-row of 2592
        // (2570 rounded up to 32), 648 columns: 21 tiles of 32, one row block.
        let short = geometry(&[10, 257], Layout::ChannelsFirst);
        assert_eq!(elementwise(&short, DType::F32, H100).grid, (21, 1, 1));
        // (N, C) = (1000, 3) f16: 3000 values, P = 768: 3 full super-rows and one of 696; 3
        // tiles, 4 super-rows in one row block of 8.
        let partial = geometry(&[1000, 3], Layout::ChannelsFirst);
        let l = elementwise(&partial, DType::F16, H100);
        assert_eq!((l.grid, l.block), ((3, 1, 1), (32, 8, 1)));
        // Tiny: 6 values, P = 32: 8 f32 columns (bx 8, by 32) or 4 f16 columns (bx 4, by 64).
        let tiny = geometry(&[2, 3], Layout::ChannelsFirst);
        assert_eq!(elementwise(&tiny, DType::F32, H100).block, (8, 32, 1));
        assert_eq!(elementwise(&tiny, DType::F16, H100).block, (4, 64, 1));
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

    /// The normalize kernels write a rows mask word from the lanes of one block row: they need
    /// `bx * VEC >= 32` (a word's 32 columns inside one block row; super-rows are whole words,
    /// kernels/epilogue.cuh, store_mask). The elementwise launch must keep it for every C and
    /// length, full super-rows or one partial one.
    #[test]
    fn rows_launches_keep_mask_words_inside_a_block() {
        for c in (1..=300).chain([511, 512, 513, 1000, 1001, 4096, 65_537]) {
            for n in [1, 3, 1000] {
                for dtype in DType::ALL {
                    let desc = TensorDesc::new(&[n, c], Layout::ChannelsLast).unwrap();
                    let g = desc.geometry();
                    assert_eq!(Traversal::of(&g), Traversal::Rows);
                    let l = elementwise(&g, dtype, H100);
                    let vec = vector_width(dtype);
                    let width = rows_map_width(c as u64, (n * c) as u64, vec);
                    assert_eq!(width % 32, 0, "C = {c}");
                    assert!(
                        width.is_multiple_of(c as u64) || width >= (n * c) as u64,
                        "C = {c}"
                    );
                    let bx = l.block.0 as u64;
                    assert!(bx * vec >= 32, "C = {c} x {n} {dtype}: {l:?}");
                }
            }
        }
    }
}
