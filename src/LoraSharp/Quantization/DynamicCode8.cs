namespace LoraSharp.Quantization;

/// <summary>
/// The 8-bit "dynamic tree" codes of bitsandbytes (Dettmers et al., 8-bit optimizers): 256 values in [−1, 1] whose
/// exponent part spans seven decades (10⁻⁶ … 1) and whose fraction part gets more values for larger magnitudes,
/// so small numbers keep relative precision. Used for QLoRA's double-quantized absmax constants and the moments of
/// the 8-bit AdamW. A value is stored as the index of the nearest code after dividing by its block's absmax.
/// </summary>
public static class DynamicCode8
{
    /// <summary>Signed code: for i = 0..6, 2^i values (midpoints of linspace(0.1, 1, 2^i + 1)) × 10^(i−6), both signs, plus 0 and 1. Sorted.</summary>
    public static float[] Signed { get; } = Build(signed: true);

    /// <summary>Unsigned code (for non-negative values such as Adam's second moment): for i = 0..6, 2^(i+1) positive values × 10^(i−6), plus 0 and 1.</summary>
    public static float[] Unsigned { get; } = Build(signed: false);

    static float[] Build(bool signed)
    {
        var data = new List<double>();
        for (int i = 0; i < 7; i++)
        {
            int items = signed ? (1 << i) : (1 << (i + 1));
            var boundaries = new double[items + 1];
            for (int k = 0; k <= items; k++) boundaries[k] = 0.1 + 0.9 * k / items;
            double decade = Math.Pow(10, -6 + i);
            for (int k = 0; k < items; k++)
            {
                double mean = (boundaries[k] + boundaries[k + 1]) / 2;
                data.Add(decade * mean);
                if (signed) data.Add(-decade * mean);
            }
        }
        data.Add(0);
        data.Add(1);
        if (data.Count != 256) throw new InvalidOperationException($"dynamic code has {data.Count} values");
        data.Sort();
        return data.Select(d => (float)d).ToArray();
    }

    /// <summary>Midpoints between consecutive codes (255 values): the bucket boundaries for nearest-code lookup.</summary>
    public static float[] Midpoints(float[] code)
    {
        var mid = new float[code.Length - 1];
        for (int i = 0; i < mid.Length; i++) mid[i] = (code[i] + code[i + 1]) / 2;
        return mid;
    }

    /// <summary>Index of the code nearest to <paramref name="x"/> (binary search over the sorted code).</summary>
    public static byte Nearest(float[] code, float x)
    {
        int lo = 0, hi = code.Length - 1;
        while (hi - lo > 1)
        {
            int mid = (lo + hi) >> 1;
            if (code[mid] <= x) lo = mid; else hi = mid;
        }
        return (byte)(Math.Abs(x - code[lo]) <= Math.Abs(code[hi] - x) ? lo : hi);
    }
}
