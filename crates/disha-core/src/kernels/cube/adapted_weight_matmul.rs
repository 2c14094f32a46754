//! The block-affine GEMM on CubeK: `out = lhs · R` with `R = W'` (forward) or `R = W'ᵀ` (input
//! gradient), run by CubeK's own matmul routines (the ones Burn's Cube backends use for
//! `matmul`: tensor-core `Cmma` tiles where the device has them, register tiles elsewhere) with
//! the adapted weight `W'` as the right-hand operand's **view**.
//!
//! CubeK's matmul reads each operand through a `View` chosen by its `MatmulArgs`. Here the
//! right-hand view is [`AdaptedWeightView`]: every vector the routine's global-memory loader reads
//! is formed from the frozen weight and the adapter at that moment, so `W'` never exists in
//! memory, not even a chunk of it. Burn `[in, out]` indexing, vectors along `out` in both
//! orientations:
//! - [`Transform::Bone`]: `W'[i, o] = W[i, o] + B[i mod r, o]` (one extra vector read);
//! - [`Transform::Bat`]: `W'[i, o] = W[i, o] + Σ_s D[a][s, p]·W[b·r + s, o] + D[a][q, p]` with
//!   `a = o / r, q = o mod r, b = i / r, p = i mod r` (PEFT orientation, method.md §4.1): `r`
//!   extra weight vectors and `2r` FLOPs per element read. The adapter is passed as `Dᵀ` per
//!   block (`[out/r, r, r]`, `Dᵀ[a][p][q] = D[a][q][p]`) so that both of its reads are vectors.
//!
//! The loaders that copy global memory asynchronously (`memcpy_async`, TMA) need a raw slice of
//! the operand and cannot apply a transform, so only routines with synchronous loaders are
//! launched: [`SimpleAlgorithm`] (cyclic loading, `Cmma` tiles) where the device has tensor
//! cores, else [`SimpleUnitAlgorithm`] (register tiles, any device).

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;
use cubecl::std::tensor::launch::ViewArg;
use cubecl::std::tensor::layout::plain::PlainLayout;
use cubecl::std::tensor::layout::{Coordinates, Coords1d};
use cubecl::std::tensor::{View, ViewExpand, ViewMut, ViewOperations, ViewOperationsExpand};
use cubecl::zspace::{Shape as MatrixShape, Strides};
use cubek::matmul::definition::{
    AvailableVectorSizes, MatmulAvailabilityError, MatmulGlobalElems, MatmulProblem,
    MatmulSetupError,
};
use cubek::matmul::multi_level::args::{BatchedCoords, MatmulArgs, Rhs as RhsElem, RhsSize};
use cubek::matmul::multi_level::components::global::memory::{
    GlobalLayout, GlobalLayoutConfig, GlobalLayoutLaunch,
};
use cubek::matmul::multi_level::components::tile::TileMatmulKind;
use cubek::matmul::multi_level::definition::Blueprint as _;
use cubek::matmul::multi_level::routines::batch::simple::{SimpleAlgorithm, SimpleArgs};
use cubek::matmul::multi_level::routines::batch::simple_unit::SimpleUnitAlgorithm;
use cubek::matmul::multi_level::{BatchMatmulRoutine, launch_kernel};
use cubek::matmul::routine::BlueprintStrategy;
use std::marker::PhantomData;

use super::Transform;

/// Comptime code of [`Transform::Bone`] in the kernels.
const BONE: u32 = 1;
/// Comptime code of [`Transform::Bat`] in the kernels.
const BAT: u32 = 2;

impl Transform {
    fn code(self) -> u32 {
        match self {
            Transform::Bone => BONE,
            Transform::Bat => BAT,
        }
    }
}

/// `W'` (or `W'ᵀ`) as a read-only view in the matmul's `(batch, row, col)` coordinates, formed
/// from the frozen weight and the adapter as it is read. `weight` and `adapter` are the raw
/// contiguous buffers, indexed in vectors of the view's vector size.
#[derive(CubeType, Clone)]
#[expand(derive(Clone))]
#[allow(dead_code, reason = "read only by the kernel expansion")]
pub(crate) struct AdaptedWeightView<'a, F: Float, N: Size> {
    weight: View<'a, Vector<F, N>, Coords1d>,
    adapter: View<'a, Vector<F, N>, Coords1d>,
    /// Rows of the view: `in` (forward) or `out` (transposed).
    rows: u32,
    /// Columns of the view: `out` (forward) or `in` (transposed).
    cols: u32,
    d_output: usize,
    r: usize,
    #[cube(comptime)]
    transform: u32,
    #[cube(comptime)]
    transposed: bool,
}

#[cube]
impl<'a, F: Float, N: Size> AdaptedWeightView<'a, F, N> {
    /// Whether `pos` lies inside the `rows × cols` matrix.
    #[allow(dead_code, reason = "called only by the kernel expansion")]
    fn in_bounds(&self, pos: BatchedCoords) -> bool {
        let (_, row, col) = pos;
        row < self.rows && col < self.cols
    }

    /// `W'` at `pos`, which must be in bounds; the vector covers `N` consecutive outputs.
    #[allow(dead_code, reason = "called only by the kernel expansion")]
    fn adapted(&self, pos: BatchedCoords) -> Vector<F, N> {
        let (_, row, col) = pos;
        let mut i = row as usize;
        let mut o = col as usize;
        if comptime!(self.transposed) {
            i = col as usize;
            o = row as usize;
        }
        let v = N::value();
        let d_output = self.d_output;
        let r = self.r;
        let mut value = self.weight.read((i * d_output + o) / v);
        if comptime!(self.transform == BONE) {
            value += self.adapter.read(((i % r) * d_output + o) / v);
        } else {
            // Dᵀ[a][p][·], the `p`-th column of D[a]: its `q..q+N` entries are this vector's
            // bias terms, its entries `s` weigh the block's weight rows.
            let row_base = (o / r) * r * r + (i % r) * r;
            let block_row0 = (i / r) * r;
            value += self.adapter.read((row_base + o % r) / v);
            let mut s0 = 0;
            while s0 < r {
                let weights = self.adapter.read((row_base + s0) / v);
                #[unroll]
                for lane in 0..v {
                    let w_row = self
                        .weight
                        .read(((block_row0 + s0 + lane) * d_output + o) / v);
                    value += w_row * Vector::<F, N>::new(weights.extract(lane));
                }
                s0 += v;
            }
        }
        value
    }

    /// `W'` at `pos`, zero outside the matrix (nothing out of bounds is read).
    #[allow(dead_code, reason = "called only by the kernel expansion")]
    fn adapted_checked(&self, pos: BatchedCoords) -> Vector<F, N> {
        let (batch, row, col) = pos;
        let in_bounds = self.in_bounds(pos);
        let safe = (
            batch,
            select(in_bounds, row, 0u32),
            select(in_bounds, col, 0u32),
        );
        select(
            in_bounds,
            self.adapted(safe),
            Vector::<F, N>::new(F::new(0.0)),
        )
    }
}

impl<'a, F: Float, N: Size> Vectorized for AdaptedWeightView<'a, F, N> {}
impl<'a, F: Float, N: Size> VectorizedExpand for AdaptedWeightViewExpand<'a, F, N> {
    fn __expand_vector_size_method(&self, scope: &Scope) -> VectorSize {
        self.weight.__expand_vector_size_method(scope)
    }
}

impl<'a, F: Float, N: Size> ViewOperations<Vector<F, N>, BatchedCoords>
    for AdaptedWeightView<'a, F, N>
{
}

impl<'a, F: Float, N: Size> ViewOperationsExpand<Vector<F, N>, BatchedCoords>
    for AdaptedWeightViewExpand<'a, F, N>
{
    fn __expand_read_method(
        &self,
        scope: &Scope,
        pos: <BatchedCoords as CubeType>::ExpandType,
    ) -> NativeExpand<Vector<F, N>> {
        self.__expand_adapted_checked_method(scope, pos)
    }

    fn __expand_read_checked_method(
        &self,
        scope: &Scope,
        pos: <BatchedCoords as CubeType>::ExpandType,
    ) -> NativeExpand<Vector<F, N>> {
        self.__expand_adapted_checked_method(scope, pos)
    }

    fn __expand_read_masked_method(
        &self,
        scope: &Scope,
        pos: <BatchedCoords as CubeType>::ExpandType,
        mask_value: NativeExpand<Vector<F, N>>,
    ) -> NativeExpand<Vector<F, N>> {
        let in_bounds = self.__expand_in_bounds_method(scope, pos);
        let value = self.__expand_adapted_checked_method(scope, pos);
        select::expand::<Vector<F, N>>(scope, in_bounds, value, mask_value)
    }

    fn __expand_read_unchecked_method(
        &self,
        scope: &Scope,
        pos: <BatchedCoords as CubeType>::ExpandType,
    ) -> NativeExpand<Vector<F, N>> {
        self.__expand_adapted_method(scope, pos)
    }

    fn __expand_as_linear_slice_method(
        &self,
        _scope: &Scope,
        _pos: <BatchedCoords as CubeType>::ExpandType,
        _size: <BatchedCoords as CubeType>::ExpandType,
    ) -> &SliceExpand<Vector<F, N>> {
        panic!("the adapted weight is formed as it is read: it has no memory to slice")
    }

    fn __expand_tensor_map_load_method(
        &self,
        _scope: &Scope,
        _barrier: &NativeExpand<Barrier>,
        _shared_memory: &mut SliceExpand<Vector<F, N>>,
        _pos: <BatchedCoords as CubeType>::ExpandType,
    ) {
        panic!("the adapted weight is formed as it is read: it cannot be loaded by TMA")
    }

    fn __expand_shape_method(&self, scope: &Scope) -> <BatchedCoords as CubeType>::ExpandType {
        let batches: NativeExpand<usize> = (u32::MAX as usize).into_expand(scope);
        (batches, self.rows, self.cols)
    }

    fn __expand_is_in_bounds_method(
        &self,
        scope: &Scope,
        pos: <BatchedCoords as CubeType>::ExpandType,
    ) -> NativeExpand<bool> {
        self.__expand_in_bounds_method(scope, pos)
    }
}

/// A view whose element type is named `E` by the caller but is `X` underneath. CubeK's
/// `MatmulArgs` hands the right-hand element type over as an opaque `CubePrimitive`, while
/// [`AdaptedWeightView`] needs it as a float vector to do arithmetic; inside the matmul kernel
/// both name CubeK's right-hand operand type (checked when the kernel is expanded), so every
/// value is passed through unchanged.
#[derive(Clone)]
struct RenamedView<'a, X: CubePrimitive, E: CubePrimitive, C: Coordinates> {
    inner: ViewExpand<'a, X, C>,
    _element: PhantomData<E>,
}

impl<'a, X: CubePrimitive, E: CubePrimitive, C: Coordinates> RenamedView<'a, X, E, C> {
    fn new(scope: &Scope, inner: ViewExpand<'a, X, C>) -> Self {
        assert_eq!(
            X::__expand_as_type(scope),
            E::__expand_as_type(scope),
            "a renamed view must keep its element type"
        );
        Self {
            inner,
            _element: PhantomData,
        }
    }

    fn out(value: NativeExpand<X>) -> NativeExpand<E> {
        NativeExpand::from(value.expand)
    }
}

impl<'a, X: CubePrimitive, E: CubePrimitive, C: Coordinates> VectorizedExpand
    for RenamedView<'a, X, E, C>
{
    fn __expand_vector_size_method(&self, scope: &Scope) -> VectorSize {
        self.inner.__expand_vector_size_method(scope)
    }
}

impl<'a, X: CubePrimitive, E: CubePrimitive, C: Coordinates> ViewOperationsExpand<E, C>
    for RenamedView<'a, X, E, C>
{
    fn __expand_read_method(&self, scope: &Scope, pos: C::ExpandType) -> NativeExpand<E> {
        Self::out(self.inner.__expand_read_method(scope, pos))
    }

    fn __expand_read_checked_method(&self, scope: &Scope, pos: C::ExpandType) -> NativeExpand<E> {
        Self::out(self.inner.__expand_read_checked_method(scope, pos))
    }

    fn __expand_read_masked_method(
        &self,
        scope: &Scope,
        pos: C::ExpandType,
        mask_value: NativeExpand<E>,
    ) -> NativeExpand<E> {
        let mask_value = NativeExpand::<X>::from(mask_value.expand);
        Self::out(
            self.inner
                .__expand_read_masked_method(scope, pos, mask_value),
        )
    }

    fn __expand_read_unchecked_method(&self, scope: &Scope, pos: C::ExpandType) -> NativeExpand<E> {
        Self::out(self.inner.__expand_read_unchecked_method(scope, pos))
    }

    fn __expand_as_linear_slice_method(
        &self,
        _scope: &Scope,
        _pos: C::ExpandType,
        _size: C::ExpandType,
    ) -> &SliceExpand<E> {
        panic!("a renamed view has no memory of its own to slice")
    }

    fn __expand_tensor_map_load_method(
        &self,
        _scope: &Scope,
        _barrier: &NativeExpand<Barrier>,
        _shared_memory: &mut SliceExpand<E>,
        _pos: C::ExpandType,
    ) {
        panic!("a renamed view cannot be loaded by TMA")
    }

    fn __expand_shape_method(&self, scope: &Scope) -> C::ExpandType {
        self.inner.__expand_shape_method(scope)
    }

    fn __expand_is_in_bounds_method(
        &self,
        scope: &Scope,
        pos: C::ExpandType,
    ) -> NativeExpand<bool> {
        self.inner.__expand_is_in_bounds_method(scope, pos)
    }
}

/// CubeK's right-hand operand vector type inside the matmul kernel.
type RhsVector = Vector<RhsElem, RhsSize>;

/// [`MatmulArgs`] whose right-hand operand is [`AdaptedWeightView`]; the left-hand operand and
/// the output are plain row-major matrices, as in CubeK's `TensorArgs`.
#[derive(Clone)]
pub(crate) struct AdaptedWeightArgs;

/// The launch inputs of [`AdaptedWeightArgs`].
#[derive(CubeLaunch, CubeType, Clone)]
#[expand(derive(Clone))]
#[allow(dead_code, reason = "read only by the kernel expansion")]
pub(crate) struct AdaptedWeightInputs<Lhs: CubePrimitive, Rhs: CubePrimitive, Acc: CubePrimitive> {
    lhs: View<'static, Lhs, BatchedCoords>,
    weight: View<'static, Rhs, Coords1d>,
    adapter: View<'static, Rhs, Coords1d>,
    /// Always absent: the product starts from zero (the field names the accumulator type).
    acc: ComptimeOption<View<'static, Acc, BatchedCoords>>,
    rows: u32,
    cols: u32,
    d_output: usize,
    r: usize,
    #[cube(comptime)]
    transform: u32,
    #[cube(comptime)]
    transposed: bool,
}

/// The launch output of [`AdaptedWeightArgs`].
#[derive(CubeLaunch, CubeType, Clone)]
#[expand(derive(Clone))]
pub(crate) struct AdaptedWeightOutput<EO: CubePrimitive> {
    out: ViewMut<'static, EO, BatchedCoords>,
}

/// The right-hand view of [`AdaptedWeightArgs`]: [`AdaptedWeightView`] over the inputs' buffers.
#[cube]
#[allow(unused_variables)]
fn adapted_rhs_view<'a, Lhs: CubePrimitive, Rhs: CubePrimitive, Acc: CubePrimitive>(
    inputs: &'a AdaptedWeightInputs<Lhs, Rhs, Acc>,
) -> View<'a, Rhs, BatchedCoords> {
    intrinsic!(|scope| {
        let weight = ViewExpand::new(
            scope,
            RenamedView::<Rhs, RhsVector, Coords1d>::new(scope, inputs.weight.clone()),
        );
        let adapter = ViewExpand::new(
            scope,
            RenamedView::<Rhs, RhsVector, Coords1d>::new(scope, inputs.adapter.clone()),
        );
        let view = AdaptedWeightViewExpand::<RhsElem, RhsSize> {
            weight,
            adapter,
            rows: inputs.rows.clone(),
            cols: inputs.cols.clone(),
            d_output: inputs.d_output.clone(),
            r: inputs.r.clone(),
            transform: inputs.transform,
            transposed: inputs.transposed,
        };
        let view = ViewExpand::<RhsVector, BatchedCoords>::new(scope, view);
        ViewExpand::new(
            scope,
            RenamedView::<RhsVector, Rhs, BatchedCoords>::new(scope, view),
        )
    })
}

#[cube]
impl MatmulArgs for AdaptedWeightArgs {
    type Output<EO: CubePrimitive> = AdaptedWeightOutput<EO>;
    type Input<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive> =
        AdaptedWeightInputs<Lhs, Rhs, EO>;
    type Config = ();
    type State<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive> =
        (AdaptedWeightInputs<Lhs, Rhs, EO>, AdaptedWeightOutput<EO>);

    fn init_state<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        input: &Self::Input<Lhs, Rhs, EO>,
        output: &mut Self::Output<EO>,
        _config: (),
        #[comptime] _lhs_layout_config: GlobalLayoutConfig,
        #[comptime] _rhs_layout_config: GlobalLayoutConfig,
        #[comptime] _out_layout_config: GlobalLayoutConfig,
    ) -> Self::State<Lhs, Rhs, EO> {
        (input.clone(), output.clone())
    }

    fn view_lhs<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        state: &Self::State<Lhs, Rhs, EO>,
    ) -> View<'_, Lhs, BatchedCoords> {
        state.0.lhs
    }

    fn batch_lhs<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        _state: &Self::State<Lhs, Rhs, EO>,
        batch: usize,
    ) -> usize {
        // One matrix: the only batch is 0, and the views add no offset for it.
        batch
    }

    fn view_rhs<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        state: &Self::State<Lhs, Rhs, EO>,
    ) -> View<'_, Rhs, BatchedCoords> {
        adapted_rhs_view::<Lhs, Rhs, EO>(&state.0)
    }

    fn batch_rhs<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        _state: &Self::State<Lhs, Rhs, EO>,
        batch: usize,
    ) -> usize {
        batch
    }

    fn view_acc<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        state: &Self::State<Lhs, Rhs, EO>,
    ) -> ComptimeOption<View<'_, EO, BatchedCoords>> {
        state.0.acc.map(|view| view)
    }

    fn batch_acc<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        _state: &Self::State<Lhs, Rhs, EO>,
        batch: usize,
    ) -> usize {
        batch
    }

    fn view_out<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        state: &Self::State<Lhs, Rhs, EO>,
    ) -> ViewMut<'_, EO, BatchedCoords> {
        state.1.out
    }

    fn batch_out<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        _state: &Self::State<Lhs, Rhs, EO>,
        batch: usize,
    ) -> usize {
        batch
    }

    fn runtime_config<Lhs: CubePrimitive, Rhs: CubePrimitive, EO: CubePrimitive>(
        _state: &Self::State<Lhs, Rhs, EO>,
    ) {
    }
}

/// Launches `lhs · W'` (`transposed = false`, output `[M, out]`) or `lhs · W'ᵀ`
/// (`transposed = true`, output `[M, in]`) in CubeK's matmul with [`AdaptedWeightView`] as the
/// right-hand operand: CubeK's `Cmma` routine where the device has tensor cores, else its
/// register-tile routine. Returns CubeK's refusal (dtypes the device cannot convert, no valid
/// vectorization, no routine for the device, or differing dtypes among the three operands) so
/// that the caller can run the op's body instead.
///
/// # Shapes
/// - `lhs`: `[M, in]` or `[M, out]`; `weight`: `[in, out]`; `adapter`: `[r, out]` (Bone) or
///   `[out/r, r, r]` (BAT, `in % r = out % r = 0`), all three in one float dtype.
pub(crate) fn adapted_weight_matmul(
    lhs: CubeTensor,
    weight: CubeTensor,
    adapter: CubeTensor,
    r: usize,
    transform: Transform,
    transposed: bool,
) -> Result<CubeTensor, MatmulSetupError> {
    let elem = dtype_to_storage_type(lhs.dtype);
    if weight.dtype != lhs.dtype || adapter.dtype != lhs.dtype {
        return Err(MatmulSetupError::Unavailable(
            MatmulAvailabilityError::TypesUnavailable {
                lhs: elem,
                rhs: dtype_to_storage_type(weight.dtype),
                output: elem,
            },
        ));
    }
    let lhs = into_contiguous(lhs);
    let weight = into_contiguous(weight);
    let adapter = match transform {
        Transform::Bone => into_contiguous(adapter),
        // Dᵀ per block, so that both adapter reads of a `W'` vector are vectors.
        Transform::Bat => into_contiguous(permute(adapter, &[0, 2, 1])),
    };
    let [m, k] = lhs.shape().dims::<2>();
    let [d_input, d_output] = weight.shape().dims::<2>();
    // The view's rows and columns, and the strides `W'` would have in `[in, out]` storage.
    let (rows, cols, rhs_strides) = if transposed {
        (d_output, d_input, [1, d_output])
    } else {
        (d_input, d_output, [d_output, 1])
    };
    let out = empty_device_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::new([m, cols]),
        lhs.dtype,
    );
    let client = lhs.client.clone();
    let elems = MatmulGlobalElems {
        lhs: elem,
        rhs: elem,
        out: elem,
    };
    let address_type = [&lhs, &weight, &adapter, &out]
        .into_iter()
        .map(|tensor| tensor.clone().binding().required_address_type(elem.size()))
        .max()
        .expect("four operands");
    let problem = MatmulProblem::from_shapes_and_strides(
        MatrixShape::new([m, k]),
        MatrixShape::new([rows, cols]),
        MatrixShape::new([m, cols]),
        Strides::new(&[k, 1]),
        Strides::new(&rhs_strides),
        Strides::new(&[cols, 1]),
        elems,
        address_type,
        None,
        None,
    )?;
    let vector_sizes =
        AvailableVectorSizes::from_type_sizes(&client, elem.size(), elem.size(), elem.size())
            // A BAT vector's outputs must share their block `a` (and `Dᵀ` rows are `r` long). First:
            // the tensor filters keep only the largest size that fits.
            .filter_rhs(|&size| transform == Transform::Bone || r.is_multiple_of(size))
            .filter_lhs_with_tensor(&problem.lhs_strides, &problem.lhs_shape, problem.lhs_layout)
            .filter_rhs_with_tensor(&problem.rhs_strides, &problem.rhs_shape, problem.rhs_layout)
            .filter_out_with_tensor(&problem.out_strides, &problem.out_shape)
            .pick_max()?;
    let operands = Operands {
        lhs,
        weight,
        adapter,
        out: out.clone(),
        rows,
        cols,
        d_output,
        r,
        transform,
        transposed,
    };
    let tensor_cores = BlueprintStrategy::Inferred(SimpleArgs {
        tile_matmul: TileMatmulKind::Cmma,
        multi_rows: false,
    });
    match launch_routine::<SimpleAlgorithm>(&operands, &problem, vector_sizes, &tensor_cores) {
        Err(MatmulSetupError::Unavailable(_)) => launch_routine::<SimpleUnitAlgorithm>(
            &operands,
            &problem,
            vector_sizes,
            &BlueprintStrategy::Inferred(Default::default()),
        )?,
        other => other?,
    }
    Ok(out)
}

/// What one [`adapted_weight_matmul`] call launches with.
struct Operands {
    lhs: CubeTensor,
    weight: CubeTensor,
    adapter: CubeTensor,
    out: CubeTensor,
    rows: usize,
    cols: usize,
    d_output: usize,
    r: usize,
    transform: Transform,
    transposed: bool,
}

/// Plans routine `A` for `problem` on the device and launches it with [`AdaptedWeightArgs`].
fn launch_routine<A: BatchMatmulRoutine<()>>(
    operands: &Operands,
    problem: &MatmulProblem,
    vector_sizes: cubek::matmul::definition::MatmulVectorSizes,
    strategy: &BlueprintStrategy<(), A>,
) -> Result<(), MatmulSetupError> {
    let client = &operands.out.client;
    let device_settings = A::device_settings(client, vector_sizes);
    let expand_info = A::expand_blueprint(problem, &device_settings, strategy)?;
    let launch_info = A::prepare(problem, &device_settings, expand_info)?;
    let blueprint = &launch_info.blueprint;
    let sizes = launch_info.vector_sizes;

    let lhs = operands.lhs.clone().binding();
    let lhs_layout =
        GlobalLayoutLaunch::from_handle(&lhs, sizes.lhs, blueprint.lhs_global_layout_config());
    let out = operands.out.clone().binding();
    let out_layout =
        GlobalLayoutLaunch::from_handle(&out, sizes.out, blueprint.out_global_layout_config());
    let buffer = |tensor: &CubeTensor| {
        ViewArg::new_tensor::<PlainLayout>(tensor.clone().binding().into_tensor_arg(), ())
    };
    let input = AdaptedWeightInputsLaunch::new(
        ViewArg::new_tensor::<GlobalLayout>(lhs.into_tensor_arg(), lhs_layout),
        buffer(&operands.weight),
        buffer(&operands.adapter),
        ComptimeOptionArgs::None,
        operands.rows as u32,
        operands.cols as u32,
        operands.d_output,
        operands.r,
        operands.transform.code(),
        operands.transposed,
    );
    let output = AdaptedWeightOutputLaunch::new(ViewArg::new_tensor::<GlobalLayout>(
        out.into_tensor_arg(),
        out_layout,
    ));
    launch_kernel::<AdaptedWeightArgs, A>(client, input, output, (), launch_info)
}
