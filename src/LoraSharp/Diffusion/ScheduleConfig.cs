using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>What the model predicts: the noise (SD1.x, SD2-base, SDXL) or the velocity (SD2 768-v).</summary>
public enum PredictionType { Epsilon, VPrediction }

/// <summary>How inference timesteps are spread over the training timesteps (diffusers' timestep_spacing).</summary>
public enum TimestepSpacing { Linspace, Leading, Trailing }

/// <summary>
/// The training noise schedule shared by all samplers (diffusers scheduler_config.json fields). Defaults are
/// Stable Diffusion 1.x: scaled_linear betas 0.00085..0.012 over 1000 steps, steps_offset 1, epsilon.
/// <see cref="Spacing"/> null means "each sampler's diffusers default" (Euler/Euler a/DPM++: linspace, DDIM: leading).
/// </summary>
public sealed record ScheduleConfig
{
    public int NumTrainTimesteps { get; init; } = 1000;
    public double BetaStart { get; init; } = 0.00085;
    public double BetaEnd { get; init; } = 0.012;
    /// <summary>"scaled_linear" (SD) or "linear".</summary>
    public string BetaSchedule { get; init; } = "scaled_linear";
    public int StepsOffset { get; init; } = 1;
    public PredictionType Prediction { get; init; } = PredictionType.Epsilon;
    public TimestepSpacing? Spacing { get; init; }

    /// <summary>Stable Diffusion 1.x (and SDXL) defaults.</summary>
    public static ScheduleConfig StableDiffusion { get; } = new();

    /// <summary>Reads the schedule fields of a diffusers scheduler_config.json; other fields are ignored.</summary>
    public static ScheduleConfig FromDiffusersJson(string path)
    {
        JsonNode? root;
        try { root = JsonNode.Parse(File.ReadAllText(path)); }
        catch (System.Text.Json.JsonException e) { throw new LoraSharpException($"not valid JSON: {e.Message}", path, inner: e); }
        if (root is not JsonObject o)
            throw new LoraSharpException("expected a JSON object", path);
        return FromJson(o, path);
    }

    /// <summary>Reads the schedule fields from a scheduler config object (see <see cref="FromDiffusersJson"/>).</summary>
    public static ScheduleConfig FromJson(JsonObject o, string source = "scheduler config")
    {
        var c = new ScheduleConfig();
        try
        {
            if (o["num_train_timesteps"] is { } n) c = c with { NumTrainTimesteps = (int)n };
            if (o["beta_start"] is { } bs) c = c with { BetaStart = (double)bs };
            if (o["beta_end"] is { } be) c = c with { BetaEnd = (double)be };
            if (o["beta_schedule"] is { } sch) c = c with { BetaSchedule = (string)sch! };
            if (o["steps_offset"] is { } so) c = c with { StepsOffset = (int)so };
            if (o["trained_betas"] is { } tb && tb is not null)
                throw new LoraSharpException("trained_betas is not supported", source, "trained_betas");
            if (o["rescale_betas_zero_snr"] is { } z && (bool)z)
                throw new LoraSharpException("rescale_betas_zero_snr is not supported", source, "rescale_betas_zero_snr");
            // diffusers records fields it filled from the class defaults in _use_default_values: those follow the sampler.
            var defaulted = o["_use_default_values"] is JsonArray d ? d.Select(x => (string?)x).ToHashSet() : [];
            if (o["timestep_spacing"] is { } ts && !defaulted.Contains("timestep_spacing"))
            {
                c = c with
                {
                    Spacing = (string?)ts switch
                    {
                        "linspace" => TimestepSpacing.Linspace,
                        "leading" => TimestepSpacing.Leading,
                        "trailing" => TimestepSpacing.Trailing,
                        var other => throw new LoraSharpException($"timestep_spacing '{other}' is not supported (expected linspace, leading or trailing)", source, "timestep_spacing"),
                    },
                };
            }
            if (o["prediction_type"] is { } pt)
            {
                c = c with
                {
                    Prediction = (string?)pt switch
                    {
                        "epsilon" => PredictionType.Epsilon,
                        "v_prediction" => PredictionType.VPrediction,
                        var other => throw new LoraSharpException($"prediction_type '{other}' is not supported (expected epsilon or v_prediction)", source, "prediction_type"),
                    },
                };
            }
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new LoraSharpException($"a schedule field has the wrong type: {e.Message}", source, inner: e);
        }
        if (c.BetaSchedule is not ("scaled_linear" or "linear"))
            throw new LoraSharpException($"beta_schedule '{c.BetaSchedule}' is not supported (expected scaled_linear or linear)", source, "beta_schedule");
        return c;
    }

    /// <summary>
    /// ᾱ_t for t = 0..N-1, computed in float32 with torch exactly as diffusers does
    /// (betas = linspace(√β0, √β1, N)² for scaled_linear; alphas_cumprod = cumprod(1 - betas)).
    /// </summary>
    public float[] AlphasCumprod()
    {
        if (NumTrainTimesteps < 2)
            throw new LoraSharpException($"num_train_timesteps must be at least 2, got {NumTrainTimesteps}", key: "num_train_timesteps");
        using var scope = NewDisposeScope();
        var betas = BetaSchedule switch
        {
            "scaled_linear" => linspace(Math.Sqrt(BetaStart), Math.Sqrt(BetaEnd), NumTrainTimesteps, dtype: ScalarType.Float32).pow(2),
            "linear" => linspace(BetaStart, BetaEnd, NumTrainTimesteps, dtype: ScalarType.Float32),
            _ => throw new LoraSharpException($"beta_schedule '{BetaSchedule}' is not supported", key: "beta_schedule"),
        };
        var alphas = 1.0f - betas;
        return alphas.cumprod(0).data<float>().ToArray();
    }

    /// <summary>σ_t = √((1-ᾱ_t)/ᾱ_t) in float32, as diffusers computes it.</summary>
    public float[] TrainSigmas()
    {
        using var scope = NewDisposeScope();
        var ac = tensor(AlphasCumprod());
        return ((1.0f - ac) / ac).pow(0.5).data<float>().ToArray();
    }
}
